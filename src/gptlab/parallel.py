"""Placing a model on devices, and the one training step every caller runs.

Parallelism is applied to the model from outside (the model file stays pure): torch.compile with
a fallback, DDP, FSDP2 with its mixed-precision policy, the batch-size search, and gathering or
restoring the full state of a placed model for checkpoints. `train_step` is what the training
loop, the benchmarks and the batch-size search all run.
"""

from __future__ import annotations

import contextlib
import math
import sys
import warnings
from dataclasses import dataclass
from typing import Iterable, Sequence

import torch
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_optimizer_state_dict)

from gptlab import dist
from gptlab.config import ModelConfig
from gptlab.errors import UserError
from gptlab.model import GPT
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


def place(model: GPT, rt: Runtime, env: dist.DistEnv, fsdp: bool = False) -> Placed:
    """Move the model to the runtime's device, then shard (FSDP) or replicate (DDP) it, compiled
    when the runtime says so. FSDP shards whole blocks, so it is placed before compiling."""
    if fsdp and not env.is_distributed:
        raise UserError("--fsdp shards over several processes: launch with torchrun or --nproc N")
    model.to(rt.device)
    if fsdp:
        shard_model(model, rt)
    forward: torch.nn.Module = compile_model(model) if rt.compile else model
    ddp = env.is_distributed and not fsdp
    if ddp:
        from torch.nn.parallel import DistributedDataParallel as DDP

        forward = DDP(forward, device_ids=[rt.device.index] if rt.device.type == "cuda" else None)
    return Placed(model=model, forward=forward, fsdp=fsdp, ddp=ddp, compiled=forward is not model and rt.compile)


def compile_model(model: torch.nn.Module, backend: str = "inductor") -> torch.nn.Module:
    """torch.compile, or the model itself with one warning line when compiling is impossible here."""
    try:
        return torch.compile(model, backend=backend)
    except Exception as e:  # an unknown backend, no compiler: train uncompiled rather than not at all
        print(f"gptlab: warning: torch.compile failed ({type(e).__name__}: {str(e).splitlines()[0][:120]}); "
              "continuing uncompiled", file=sys.stderr)
        return model


def shard_model(model: GPT, rt: Runtime) -> None:
    """FSDP2: shard each block, then the rest (embeddings, final norm); parameters become DTensors.
    hidden() and logits() are registered as forward methods, so evaluation and sampling can call
    them directly and still gather the shards they need."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

    # the model returns a view of the logits (real vocab only); FSDP2 warns about in-place ops on it
    warnings.filterwarnings("ignore", message=".*returned a view tensor.*")
    kw = {}
    if rt.dtype != torch.float32:
        kw["mp_policy"] = MixedPrecisionPolicy(param_dtype=rt.dtype, reduce_dtype=torch.float32)
    for block in model.transformer.h:
        fully_shard(block, **kw)
    fully_shard(model, **kw)
    for method in ("hidden", "logits"):
        register_fsdp_forward_method(model, method)


@dataclass
class StepResult:
    loss: float
    """Mean loss over the global batch (all micro-steps, all ranks)."""
    grad_norm: float | None
    """Global gradient norm before clipping (None when no update was asked for)."""
    applied: bool = True
    """False when a non-finite loss or gradient norm kept the update from being applied."""


Optimizers = torch.optim.Optimizer | Sequence[torch.optim.Optimizer]


def _as_list(optimizer: Optimizers | None) -> list[torch.optim.Optimizer]:
    if optimizer is None:
        return []
    return [optimizer] if isinstance(optimizer, torch.optim.Optimizer) else list(optimizer)


def train_step(placed: Placed, rt: Runtime, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], accum: int,
               optimizer: Optimizers | None = None, scaler: torch.amp.GradScaler | None = None,
               grad_clip: float = 0.0) -> StepResult:
    """Forward and backward over `accum` micro-batches (gradients synchronised once, on the last),
    then clip and update. A non-finite loss or norm skips the update (gradients are dropped) and is
    reported in the result, so the caller decides. optimizer=None runs forward and backward only;
    a list of optimizers (AdamW + Muon) is clipped over together and stepped one after another."""
    loss_sum = torch.zeros((), device=rt.device, dtype=torch.float32)
    for micro, (x, y) in enumerate(batches):
        x, y = x.to(rt.device, non_blocking=True), y.to(rt.device, non_blocking=True)
        with _sync_context(placed, last=micro == accum - 1):
            with rt.autocast():
                # uncompiled, the output layer's loss is fused and chunked (model.FusedHeadLoss)
                _, loss = placed.forward(x, y, return_logits=placed.compiled)
            loss = loss / accum
            loss_sum += loss.detach()
            (scaler.scale(loss) if scaler is not None else loss).backward()
    dist.all_reduce_mean(loss_sum)
    loss_val = float(loss_sum.item())
    opts = _as_list(optimizer)
    if not opts:
        return StepResult(loss_val, None, applied=False)
    for opt in opts if scaler is not None else ():
        scaler.unscale_(opt)
    norm = grad_norm(placed.model, grad_clip)
    # with a loss scale an inf norm is routine: the scaler skips that update and lowers the scale
    if not math.isfinite(loss_val) or (scaler is None and not math.isfinite(norm)):
        for opt in opts:
            opt.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.update()
        return StepResult(loss_val, norm, applied=False)
    for opt in opts:
        if scaler is not None:
            scaler.step(opt)  # skips the update itself on inf/nan gradients
        else:
            opt.step()
    if scaler is not None:
        scaler.update()  # once per step, after every optimizer: lowers the scale on inf/nan
    for opt in opts:
        opt.zero_grad(set_to_none=True)
    return StepResult(loss_val, norm)


def _sync_context(placed: Placed, last: bool):
    """Gradients are reduced once per step, after the last micro-batch."""
    if placed.fsdp:
        placed.model.set_requires_gradient_sync(last)
    elif placed.ddp and not last:
        return placed.forward.no_sync()
    return contextlib.nullcontext()


def grad_norm(model: torch.nn.Module, clip: float) -> float:
    """The global gradient norm (clipped to `clip` when clip > 0)."""
    params = [p for p in model.parameters() if p.grad is not None]
    if clip > 0:
        norm = torch.nn.utils.clip_grad_norm_(params, clip)
    else:
        norm = torch.nn.utils.get_total_norm([p.grad for p in params])
    if hasattr(norm, "full_tensor"):  # a DTensor under FSDP
        norm = norm.full_tensor()
    return float(norm)


def find_batch_size(model_cfg: ModelConfig, rt: Runtime, total_batch_tokens: int, env: dist.DistEnv) -> int:
    """The largest micro-batch that divides this rank's share of the global batch and fits in memory
    (GPU), keeping the global batch by adjusting accumulation. Memory is not the limit on a CPU,
    where it takes the largest divisor up to 16. The probe runs the same train_step as training."""
    T = model_cfg.seq_len
    seqs = total_batch_tokens // (T * env.world_size)
    divisors = [b for b in range(seqs, 0, -1) if seqs % b == 0]
    if rt.device.type != "cuda":
        return next(b for b in divisors if b <= 16)
    placed = Placed(model=GPT(model_cfg).to(rt.device), forward=None)  # type: ignore[arg-type]
    placed.forward = placed.model
    n_params = sum(p.numel() for p in placed.model.parameters())
    # AdamW keeps two fp32 moments per parameter; reserve them while probing
    reserve = torch.empty(2 * n_params, dtype=torch.float32, device=rt.device)
    chosen = 1
    try:
        for b in [d for d in divisors if d <= 1024]:
            ok = torch.ones(1, device=rt.device)
            try:
                x = torch.randint(0, model_cfg.vocab_size, (b, T), device=rt.device)
                train_step(placed, rt, [(x, x)], accum=1)
                rt.synchronize()
            except torch.OutOfMemoryError:
                ok.zero_()
            placed.model.zero_grad(set_to_none=True)
            x = None
            torch.cuda.empty_cache()
            if env.is_distributed:
                # every rank must choose the same size: the minimum of the flags
                ok = ok.neg()
                dist.all_reduce_max(ok)
                ok = ok.neg()
            if ok.item() > 0:
                chosen = b
                break
    finally:
        del reserve, placed
        torch.cuda.empty_cache()
    return chosen


# ----------------------------------------------------------------------------- full state of a placed model

def _full_state_options() -> StateDictOptions:
    return StateDictOptions(full_state_dict=True, cpu_offload=True)


def gather_state(placed: Placed, optimizer: Optimizers):
    """Full model weights (FSDP only; None means read them from the module) and the optimizer state
    keyed by parameter name, the same for DDP, FSDP and one process. Collective under FSDP. Several
    optimizers (AdamW + Muon) give one state: their parameters' states and all their param groups."""
    opts = _full_state_options()
    weights = get_model_state_dict(placed.model, options=opts) if placed.fsdp else None
    return weights, get_optimizer_state_dict(placed.model, _as_list(optimizer), options=opts)


def load_optimizer(placed: Placed, optimizer: Optimizers, full_state: dict) -> None:
    """Restore optimizers from a full, name-keyed state (any world size, with or without FSDP)."""
    # the saving device's implementation choices must not override this device's, nor the saved
    # peak lr this run's --lr / --muon-lr
    opts = _as_list(optimizer)
    keep = [{k: g[k] for k in ("fused", "foreach", "capturable", "peak_lr") if k in g}
            for opt in opts for g in opt.param_groups]
    set_optimizer_state_dict(placed.model, opts, full_state, options=_full_state_options())
    # loading replaced the group dicts: read them again
    for g, kept in zip([g for opt in opts for g in opt.param_groups], keep):
        g.update(kept)
