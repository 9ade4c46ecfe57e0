"""Placing a model on devices; the training step itself is train.py's.

Parallelism is applied to the model from outside (the model file stays pure): torch.compile with
a fallback (the whole model, or each block under FSDP), DDP, FSDP2 (also built on the meta device),
and gathering or restoring the full state of a placed model for checkpoints.
"""

from __future__ import annotations

import contextlib
import sys
import warnings
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from gptlab import dist
from gptlab.config import ModelConfig
from gptlab.errors import UserError
from gptlab.model import GPT
from gptlab.optim import as_list
from gptlab.runtime import Runtime


@dataclass
class Placed:
    """A model placed for training. `model` owns the parameters (DTensors under FSDP); `forward`
    is what a step calls: the model, compiled and/or wrapped by DDP."""

    model: GPT
    forward: torch.nn.Module
    fsdp: bool = False
    ddp: bool = False
    compiled: bool = False
    guard: "CompileFallback | None" = None
    """The compiled model's fallback to eager mode (None when not compiled)."""

    @property
    def compiled_head(self) -> bool:
        """Whether the output layer runs compiled: then a step asks for the logits and plain
        cross-entropy, which the compiler fuses; else the fused, chunked loss. Under FSDP only the
        blocks are compiled (compile_blocks)."""
        return self.compiled and not self.fsdp and (self.guard is None or self.guard.active)

    def eval_forward(self) -> Callable | None:
        """What runs a val batch, forward(x, y) -> (logits, loss), when the model is compiled: the
        compiled model (not the DDP wrapper, whose forward would sync buffers), or under FSDP the
        model with its compiled blocks, in the mode and grad state the caller set (eval, no
        gradients: one more graph). None when uncompiled: the raw module runs it."""
        if self.guard is None or not self.guard.active:
            return None
        if not self.fsdp:
            guard, head = self.guard, self.compiled_head
            return lambda x, y: guard(x, y, return_logits=head)
        blocks = [b.__dict__["forward"] for b in self.model.transformer.h
                  if isinstance(b.__dict__.get("forward"), _TrainingForward)]

        def run(x: torch.Tensor, y: torch.Tensor):
            for f in blocks:
                f.always = True
            try:
                return self.model(x, y, return_logits=False)
            finally:
                for f in blocks:
                    f.always = False
        return run


def place(model: GPT, rt: Runtime, env: dist.DistEnv, fsdp: bool = False, compile_backend: str = "inductor") -> Placed:
    """Move the model to the runtime's device, then shard (FSDP) or replicate (DDP) it, compiled
    when the runtime says so. FSDP shards whole blocks, so it is placed before compiling."""
    if fsdp and not env.is_distributed:
        raise UserError("--fsdp shards over several processes: launch with torchrun or --nproc N")
    model.to(rt.device)
    if fsdp:
        shard_model(model, rt)
    forward = _compiled(model, rt, fsdp, compile_backend)
    guard = forward if isinstance(forward, CompileFallback) else None
    ddp = env.is_distributed and not fsdp
    if ddp:
        from torch.nn.parallel import DistributedDataParallel as DDP

        forward = DDP(forward, device_ids=[rt.device.index] if rt.device.type == "cuda" else None, gradient_as_bucket_view=True)
    return Placed(model=model, forward=forward, fsdp=fsdp, ddp=ddp, compiled=guard is not None, guard=guard)


def _compiled(model: GPT, rt: Runtime, fsdp: bool, backend: str) -> torch.nn.Module:
    """What a step calls: the model itself, compiled whole, or (FSDP) with its blocks compiled."""
    if not rt.compile:
        return model
    return compile_blocks(model, backend) if fsdp else compile_model(model, backend)


def compile_model(model: torch.nn.Module, backend: str = "inductor") -> torch.nn.Module:
    """torch.compile behind a CompileFallback, or the model itself with one warning line when
    compiling is impossible here (an unknown backend, say). Static shapes (dynamic=False): a training
    step's shapes never change, and a new shape (the batch-size search's next size) compiles a graph
    of its own rather than one with a symbolic batch dimension, which is slower on a GPU."""
    try:
        return CompileFallback(model, torch.compile(model, backend=backend, dynamic=False))
    except Exception as e:  # train uncompiled rather than not at all
        _compile_warning(e)
        return model


def compile_blocks(model: GPT, backend: str = "inductor") -> torch.nn.Module:
    """FSDP: each block's forward compiled, as torchtitan does, behind a CompileFallback. Compiling
    the root instead, dynamo breaks the graph at every FSDP hook. Here the hooks (all-gather before
    a block, reshard after) run around the compiled forward, outside the graph, and all blocks share
    one static graph. The embeddings, the position add and the final norm stay eager (a gather, an
    add and one norm beside L blocks), and the output layer takes the fused, chunked loss.
    Compiled for training: evaluation and sampling (no gradients, eval mode or a KV cache) run the
    blocks eager, and so never recompile them, except val loss during training (Placed.eval_forward:
    fixed shapes, one more graph)."""
    blocks = list(model.transformer.h)

    def undo() -> None:
        for block in blocks:
            block.__dict__.pop("forward", None)  # the class's forward again

    try:
        for block in blocks:
            block.forward = _TrainingForward(block, torch.compile(block.forward, backend=backend, dynamic=False))
    except Exception as e:  # train uncompiled rather than not at all
        undo()
        _compile_warning(e)
        return model
    return CompileFallback(model, model, undo=undo)


class _TrainingForward:
    """A block's forward: the compiled one in a training step (and with `always`, in any mode
    without a cache: Placed.eval_forward), the block's own otherwise."""

    def __init__(self, block: torch.nn.Module, compiled: Callable):
        self.eager, self.compiled, self.block = block.forward, compiled, block
        self.always = False

    def __call__(self, x: torch.Tensor, cache=None) -> torch.Tensor:
        if cache is None and (self.always or (self.block.training and torch.is_grad_enabled())):
            return self.compiled(x)
        return self.eager(x, cache)


def _compile_warning(e: BaseException) -> None:
    cause = e.__cause__ if e.__cause__ is not None else e  # dynamo wraps the backend's own error
    first = (str(cause).strip().splitlines() or [""])[0][:160]
    print(f"gptlab: warning: torch.compile failed ({type(e).__name__}: {first}); continuing uncompiled",
          file=sys.stderr, flush=True)


class CompileFallback(torch.nn.Module):
    """The compiled model until it fails: compiling happens at the first call (and the backward
    graph at the first backward), so a missing Triton or C compiler, an unsupported op or a broken
    backend shows up there. Then one warning line, and the module itself from then on. train.train_step
    marks it `verified` after its first complete step; after that, errors are not caught."""

    def __init__(self, module: torch.nn.Module, compiled: Callable, undo: Callable[[], None] | None = None):
        super().__init__()
        self.module = module  # the name checkpoint.raw_model unwraps
        self._compiled = [compiled]  # in a list: not a submodule, so no second copy of the weights
        self._undo = undo  # makes `module` itself eager again (compile_blocks compiled parts of it)
        self.verified = False

    @property
    def active(self) -> bool:
        return bool(self._compiled)

    def fall_back(self, e: BaseException) -> None:
        if self._compiled:
            _compile_warning(e)
            self._compiled.clear()
            if self._undo is not None:
                self._undo()

    def forward(self, *args, **kwargs):
        if self._compiled and self.verified:
            return self._compiled[0](*args, **kwargs)
        if self._compiled:
            try:
                return self._compiled[0](*args, **kwargs)
            except torch.OutOfMemoryError:
                raise
            except Exception as e:
                self.fall_back(e)
        return self.module(*args, **kwargs)


def shard_model(model: GPT, rt: Runtime) -> None:
    """FSDP2: shard each block, then the rest (embeddings, final norm); parameters become DTensors.
    hidden() and logits() are registered as forward methods, so evaluation and sampling can call
    them directly and still gather the shards they need.

    No mixed-precision policy: the shards are gathered in fp32 and autocast (Runtime.autocast)
    decides every compute dtype, exactly as under DDP, so `--fsdp` is the same recipe: the residual
    stream stays fp32, layer norms use fp32 weights, gradients are fp32 and reduced in fp32. FSDP2's
    bf16 param_dtype would cast each block's input to bf16 (cast_forward_inputs) and round the norms'
    weights; keeping fp32 costs all-gathers of 4 bytes a parameter instead of 2 (with the fp32
    reduce-scatter, 12 bytes a parameter a micro-batch instead of 8), which FSDP2 overlaps with
    the previous block's compute."""
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    # the model returns a view of the logits (real vocab only); FSDP2 warns about in-place ops on it
    warnings.filterwarnings("ignore", message=".*returned a view tensor.*")
    for block in model.transformer.h:
        fully_shard(block)
    fully_shard(model)
    for method in ("hidden", "logits"):
        register_fsdp_forward_method(model, method)


Optimizers = torch.optim.Optimizer | Sequence[torch.optim.Optimizer]


# ----------------------------------------------------------------------------- full state of a placed model

def _dsd():
    """torch.distributed.checkpoint.state_dict, imported on first use (0.7 s: commands that never
    gather or scatter a placed model's state do not pay it)."""
    from torch.distributed.checkpoint import state_dict

    return state_dict


def _full_state_options():
    return _dsd().StateDictOptions(full_state_dict=True, cpu_offload=True)


def gather_state(placed: Placed, optimizer: Optimizers):
    """Full model weights (FSDP only; None means read them from the module) and the optimizer state
    keyed by parameter name (full_optimizer_state). Collective under FSDP."""
    weights = _dsd().get_model_state_dict(placed.model, options=_full_state_options()) if placed.fsdp else None
    return weights, full_optimizer_state(placed.model, optimizer)


def full_optimizer_state(model: torch.nn.Module, optimizer: Optimizers) -> dict:
    """The optimizer state keyed by parameter name, on the CPU, the same for DDP, FSDP and one
    process. Collective under FSDP. Several optimizers (AdamW + Muon) give one state: their
    parameters' states and all their param groups."""
    return _dsd().get_optimizer_state_dict(model, as_list(optimizer), options=_full_state_options())


@contextlib.contextmanager
def gradients_set_aside(model: torch.nn.Module):
    """The parameters' gradients set aside, then put back (the same tensors: DDP's bucket views stay
    views). torch's state-dict helpers make a fresh optimizer's state with a zero-gradient step only
    when no parameter has a gradient; with gradients present (train.place_for_training makes them
    before DDP) they would find no state to load the checkpoint's moments into."""
    params = list(model.parameters())
    grads = [p.grad for p in params]
    for p in params:
        p.grad = None
    try:
        yield
    finally:
        for p, g in zip(params, grads):
            p.grad = g


def load_optimizer(placed: Placed, optimizer: Optimizers, full_state: dict) -> None:
    """Restore optimizers from a full, name-keyed state (any world size, with or without FSDP)."""
    # the saving device's implementation choices must not override this device's, nor the saved
    # peak lr this run's --lr / --muon-lr
    opts = as_list(optimizer)
    keep = [{k: g[k] for k in ("fused", "foreach", "capturable", "peak_lr") if k in g}
            for opt in opts for g in opt.param_groups]
    with gradients_set_aside(placed.model):
        _dsd().set_optimizer_state_dict(placed.model, opts, full_state, options=_full_state_options())
    # loading replaced the group dicts: read them again
    for g, kept in zip([g for opt in opts for g in opt.param_groups], keep):
        g.update(kept)
    state_to_param_device(optimizer)


# ----------------------------------------------------------------------------- FSDP without a full model per rank

def place_sharded(model_cfg: ModelConfig, rt: Runtime, env: dist.DistEnv, seed: int,
                  full_state: Callable[[], dict[str, torch.Tensor]] | None = None, init: bool = True,
                  compile_backend: str = "inductor") -> Placed:
    """FSDP2 built on the meta device: the model is sharded before it has any storage, then each
    rank allocates only its own shards on its device and fills them in place, either with the
    eager initialisation replayed (full_state None) or with weights that rank 0 alone reads
    (full_state() is called on rank 0 only) and sends out shard by shard. init=False leaves the
    shards uninitialised, for a caller that loads every value next (a sharded checkpoint)."""
    if not env.is_distributed:
        raise UserError("--fsdp shards over several processes: launch with torchrun or --nproc N")
    with torch.device("meta"):
        model = GPT(model_cfg)
    shard_model(model, rt)
    model.to_empty(device=rt.device)
    if full_state is None:
        if init:
            init_shards_like_eager(model, seed)
    else:
        sd = full_state() if env.is_main else {}
        dsd = _dsd()
        options = dsd.StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
        dsd.set_model_state_dict(model, sd, options=options)
    forward = _compiled(model, rt, True, compile_backend)
    guard = forward if isinstance(forward, CompileFallback) else None
    return Placed(model=model, forward=forward, fsdp=True, compiled=guard is not None, guard=guard)


_INIT_TYPES = (torch.nn.Linear, torch.nn.Embedding, torch.nn.LayerNorm)


def _cpu_twin(m: torch.nn.Module) -> torch.nn.Module:
    """A full-size CPU module of the same kind and shape, built by its own constructor (so it
    draws from the global RNG exactly as the original's construction did)."""
    if isinstance(m, torch.nn.Linear):
        twin = torch.nn.Linear(m.in_features, m.out_features, bias=m.bias is not None)
    elif isinstance(m, torch.nn.Embedding):
        twin = torch.nn.Embedding(m.num_embeddings, m.embedding_dim)
    else:
        twin = torch.nn.LayerNorm(m.normalized_shape, eps=m.eps, elementwise_affine=m.elementwise_affine)
    if getattr(m, "residual_scale", False):
        twin.residual_scale = True
    return twin


def init_shards_like_eager(model: GPT, seed: int) -> None:
    """Fill a materialised (sharded) GPT with exactly the values `torch.manual_seed(seed); GPT(cfg)`
    gives on the CPU: the global RNG is replayed in the eager order, one full tensor at a time
    (at most one parameter's worth of memory), and each rank keeps its own rows of it.
    Eager order: every module's constructor draws (registration order), then GPT.apply(_init_weights)
    draws again (children before parents); only the second draw's values remain."""
    torch.manual_seed(seed)
    for m in model.modules():  # 1: constructors' draws, values thrown away
        if isinstance(m, _INIT_TYPES):
            _cpu_twin(m)

    def reinit(m: torch.nn.Module) -> None:  # 2: _init_weights' draws, values kept
        if not isinstance(m, _INIT_TYPES):
            return
        with torch.random.fork_rng(devices=[]):
            twin = _cpu_twin(m)  # its own constructor's draws must not count here
        model._init_weights(twin)
        with torch.no_grad():
            for name, full in twin.named_parameters(recurse=False):
                _copy_my_rows(getattr(m, name), full)

    model.apply(reinit)


def _copy_my_rows(param: torch.Tensor, full: torch.Tensor) -> None:
    """Copy this rank's part of the full tensor into a parameter (FSDP2 shards dim 0 like torch.chunk)."""
    if not hasattr(param, "to_local"):
        param.copy_(full)
        return
    local = param.to_local()
    mesh = param.device_mesh
    rank, n = mesh.get_local_rank(), mesh.size()
    chunks = full.chunk(n, dim=0)
    if rank < len(chunks):
        local.copy_(chunks[rank])
    else:
        assert local.numel() == 0, "a rank past the last chunk holds no rows"


def state_to_param_device(optimizer: Optimizers) -> None:
    """Every state tensor on its parameter's device. torch placed `step` by the saved run's flags:
    on the CPU for a run that was not fused, where a fused (or capturable) AdamW needs it on the
    parameters' device. Other optimizers keep `step` on the CPU, as torch wants it."""
    for opt in as_list(optimizer):
        _state_to_param_device(opt)


def _state_to_param_device(optimizer: torch.optim.Optimizer) -> None:
    for group in optimizer.param_groups:
        step_on_device = bool(group.get("fused") or group.get("capturable"))
        for p in group["params"]:
            st = optimizer.state.get(p, {})
            for k, v in st.items():
                if torch.is_tensor(v) and (k != "step" or step_on_device) and v.device != p.device:
                    st[k] = v.to(p.device)
