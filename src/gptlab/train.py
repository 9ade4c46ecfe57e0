"""`gptlab train`: a Trainer sets a run up, then trains it: a loop of train_step, with evaluation and
checkpoints at their intervals, and plots at the end.

One optimizer step, top to bottom, all in this file (Trainer.train_step -> train_step):
  the learning rate of this step (optim.lr_at, a factor of each group's peak)
  -> forward and backward over the micro-batches, gradients synchronised once, on the last
  -> unscale (fp16's loss scale) -> clip the global gradient norm -> the mean loss and the stop flag
     over ranks in one all_reduce, read on the host with the norm in one sync (_reduce_step)
  -> a non-finite loss or norm: no update, counted against --skip-nonfinite (then stop); a loss
     spike (--skip-spikes: a z-score over the recent applied steps' losses): no update, else
     every optimizer steps -> the loss scale is updated -> gradients are dropped -> one log record
  -> K spikes within a window (--spike-rollback): back to the weights, optimizer and RNG states of
     the newest scheduled checkpoint before them, the data going on past their batches.

A run directory holds everything (see DESIGN). A run stopped by SIGTERM/SIGINT saves a checkpoint
at the current step boundary; `resume=True` continues it exactly: same weights, optimizer state,
data position, RNG states, schedule and step count.
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import signal
import sys
import time
import types
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch
from tqdm.auto import tqdm

from gptlab import checkpoint as ckpt_mod
from gptlab import dist, evaluate, hellaswag, watchdog
from gptlab.checkpoint import Checkpointer, TrainState
from gptlab.config import DATA_FIELDS, MODEL_FIELDS, PRESETS, ModelConfig, TrainConfig
from gptlab.data.fingerprint import data_fingerprint
from gptlab.data.loader import TrainLoader, val_windows
from gptlab.data.remote import is_remote
from gptlab.errors import UserError, require_extra
from gptlab.generate import generate_ids
from gptlab.metrics import MetricsLogger, RunClock, progress_bar
from gptlab.model import GPT
from gptlab.optim import as_list, lr_at, make_optimizers, scale_lr
from gptlab.parallel import Placed, load_optimizer, place, place_sharded
from gptlab.plot import plot_run
from gptlab.rundir import RunDir
from gptlab.runtime import Runtime, get_runtime, reuse_freed_host_memory
from gptlab.chat import bind_chat
from gptlab.tokenizer import (bind_data_tokenizer, get_tokenizer, model_tokenizer, read_model_dir_tokenizer,
                              val_tokenizer)

SAMPLE_PROMPTS = ("Hello, I'm a language model,", "The meaning of life is")


@dataclass
class TrainResult:
    run_dir: Path
    steps: int
    final_loss: float | None
    val_loss: float | None = None
    stopped_by: str | None = None
    checkpoint: Path | None = None


# ----------------------------------------------------------------------------- signals

class StopFlag:
    """SIGTERM/SIGINT set a flag; the loop saves at the next step boundary and exits."""

    def __init__(self, announce: bool = False) -> None:
        self.signal: str | None = None
        self._old: dict[int, Any] = {}
        self.announce = announce
        """Say at once what the first signal does (rank 0): a long step ends minutes later."""

    def _handler(self, signum, frame) -> None:
        if self.signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C means now
        first = self.signal is None
        self.signal = signal.Signals(signum).name
        if first and self.announce:
            with contextlib.suppress(Exception):  # (a write interrupted mid-way must not fail the run)
                sys.stderr.write(f"\ngptlab train: {self.signal}: stopping after this step, with a checkpoint; "
                                 f"Ctrl-C again to stop now\n")
                sys.stderr.flush()

    def __enter__(self) -> "StopFlag":
        for s in (signal.SIGTERM, signal.SIGINT):
            try:
                self._old[s] = signal.signal(s, self._handler)
            except ValueError:  # not the main thread (e.g. a notebook worker)
                pass
        return self

    def __exit__(self, *exc) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)


def _reduce_step(loss_sum: torch.Tensor, stop: bool, norm: torch.Tensor | float | None) -> tuple[float, bool, float | None]:
    """The step's one collective and its one host sync: [this rank's loss, its stop flag] averaged over
    ranks in one all_reduce (the flag's mean is > 0 when any rank has one), the gradient norm (the same
    on every rank) carried to the host in the same tensor."""
    packed = torch.zeros(3, device=loss_sum.device, dtype=torch.float32)  # [loss, stop, norm]
    packed[0] = loss_sum  # device copies: no sync
    if stop:
        packed[1] = 1.0
    if norm is not None:
        packed[2] = norm  # (a 0-d tensor, or a float)
    dist.all_reduce_mean(packed[:2])
    loss, flag, n = packed.tolist()
    return loss, flag > 0, (n if norm is not None else None)


# ----------------------------------------------------------------------------- config

def grad_accum_steps(cfg: TrainConfig, seq_len: int, world_size: int, batch_size: int | None = None) -> int:
    return cfg.grad_accum_steps(seq_len, world_size, batch_size)


def validate(cfg: TrainConfig) -> None:
    cfg.validate()


def total_steps(cfg: TrainConfig, loader) -> int:
    return cfg.total_steps(loader.tokens_per_epoch)


def warmup_for(cfg: TrainConfig, steps: int) -> int:
    return cfg.warmup_for(steps)


def resume_config(run: RunDir, flags: dict[str, Any]) -> TrainConfig:
    """The run's own config, with the flags given alongside --resume applied where they are safe."""
    base = TrainConfig.from_dict(run.read_config()["train"])
    for name, value in flags.items():
        if value is None or name in ("out",):
            continue
        if getattr(base, name) == value or (name == "data" and same_path(base.data, value)):
            continue
        if name in MODEL_FIELDS:
            now = getattr(base, name)
            if now is None and hasattr(ModelConfig, name):  # the preset's value: the run's real shape
                now = getattr(base.model_config(), name)
            if now == value:
                continue
            raise UserError(f"--{name.replace('_', '-')} would change the model of a run being resumed "
                            f"({now!r} -> {value!r}); start a new run with another --out instead")
        if name == "optimizer":  # the checkpoint holds the other optimizer's state
            raise UserError(f"--optimizer {value} would change the optimizer of a run being resumed "
                            f"(it trains with {base.optimizer}); start a new run with another --out instead")
        if name in DATA_FIELDS:
            raise UserError(f"--{name.replace('_', '-')} would change the data order of a run being resumed "
                            f"({getattr(base, name)!r} -> {value!r}); start a new run with another --out instead")
        setattr(base, name, value)
    base.out = str(run.path)
    return base


def same_path(a: str | Path, b: str | Path) -> bool:
    """Whether two spellings (relative, absolute, through links) name the same directory."""
    return os.path.realpath(a) == os.path.realpath(b)


# ----------------------------------------------------------------------------- one step

@dataclass
class StepResult:
    loss: float
    """Mean loss over the global batch (all micro-steps, all ranks)."""
    grad_norm: float | None
    """Global gradient norm before clipping (None when no update was asked for)."""
    applied: bool = True
    """False when a non-finite loss or gradient norm, or a veto (a loss spike), kept the update out."""
    skip_reason: str | None = None
    """Why the update was not applied: "nonfinite", or the veto's reason ("spike")."""
    stop: bool = False
    """Whether a rank asked to stop (train_step's `stop` on any rank): every rank gets the same."""


Optimizers = torch.optim.Optimizer | Sequence[torch.optim.Optimizer]


def train_step(placed: Placed, rt: Runtime, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], accum: int,
               optimizer: Optimizers | None = None, scaler: torch.amp.GradScaler | None = None,
               grad_clip: float = 0.0, veto: Callable[[float], str | None] | None = None,
               stop: bool = False) -> StepResult:
    """One optimizer step, as the Trainer, the benchmark and the batch-size search all run it:
    forward and backward over `accum` micro-batches, then unscale, clip and update. A non-finite
    loss or norm skips the update (gradients are dropped) and says so in the result (the Trainer
    counts it against --skip-nonfinite). `veto` sees the finite loss (the mean over every rank, so
    every rank decides alike) before the update and may keep it out, returning its reason (the
    Trainer's spike detector). optimizer=None runs forward and backward only; a list of optimizers
    (AdamW + Muon) is clipped over together and stepped one after another. `stop` (this rank's stop
    flag) travels in the loss's all_reduce: one collective and one host sync a step (_reduce_step)."""
    loss_sum = forward_backward(placed, rt, batches, accum, scaler)
    opts = as_list(optimizer) if optimizer is not None else []
    for opt in opts if scaler is not None else ():
        scaler.unscale_(opt)
    loss, stop, norm = _reduce_step(loss_sum, stop, grad_norm(placed.model, grad_clip) if opts else None)
    if not opts:
        return StepResult(loss, None, applied=False, stop=stop)
    # with a loss scale an inf norm is routine: the scaler skips that update and lowers the scale
    applied = math.isfinite(loss) and (scaler is not None or math.isfinite(norm))
    reason = None if applied else "nonfinite"
    if applied and veto is not None:
        reason = veto(loss)
        applied = reason is None
    for opt in opts if applied else ():
        if scaler is not None:
            scaler.step(opt)  # skips the update itself on inf/nan gradients
        else:
            opt.step()
    if scaler is not None:
        scaler.update()  # once per step, after every optimizer: lowers the scale on inf/nan
    for opt in opts:
        opt.zero_grad(set_to_none=not placed.ddp)  # DDP's gradients stay views of its buckets
    return StepResult(loss, norm, applied=applied, skip_reason=reason, stop=stop)


def forward_backward(placed: Placed, rt: Runtime, batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
                     accum: int, scaler: torch.amp.GradScaler | None = None) -> torch.Tensor:
    """Gradients of the mean loss over `accum` micro-batches, reduced over ranks once, after the
    last; returns this rank's mean loss, on the device (train_step reduces it with the stop flag)."""
    loss_sum = torch.zeros((), device=rt.device, dtype=torch.float32)
    for micro, (x, y) in enumerate(batches):
        x, y = x.to(rt.device, non_blocking=True), y.to(rt.device, non_blocking=True)
        with _sync_context(placed, last=micro == accum - 1):
            loss_sum += _guarded_micro_batch(placed, rt, x, y, accum, scaler)
    return loss_sum


def _micro_batch(placed: Placed, rt: Runtime, x: torch.Tensor, y: torch.Tensor, accum: int,
                 scaler: torch.amp.GradScaler | None) -> torch.Tensor:
    with rt.autocast():
        # uncompiled, the output layer's loss is fused and chunked (model.FusedHeadLoss)
        _, loss = placed.forward(x, y, return_logits=placed.compiled_head)
    loss = loss / accum
    (scaler.scale(loss) if scaler is not None else loss).backward()
    return loss.detach()


def _guarded_micro_batch(placed: Placed, rt: Runtime, x: torch.Tensor, y: torch.Tensor, accum: int,
                         scaler: torch.amp.GradScaler | None) -> torch.Tensor:
    """One micro-batch. The first one through a compiled model is guarded: if compiling its forward
    or its backward fails, the gradients are dropped and the micro-batch runs again uncompiled."""
    guard = placed.guard
    if guard is None or guard.verified or not guard.active:
        return _micro_batch(placed, rt, x, y, accum, scaler)
    try:
        loss = _micro_batch(placed, rt, x, y, accum, scaler)
    except torch.OutOfMemoryError:
        raise
    except Exception as e:
        guard.fall_back(e)
        placed.model.zero_grad(set_to_none=True)
        loss = _micro_batch(placed, rt, x, y, accum, scaler)
    guard.verified = True
    placed.compiled = guard.active
    return loss


def _sync_context(placed: Placed, last: bool):
    """Gradients are reduced once per step, after the last micro-batch."""
    if placed.fsdp:
        placed.model.set_requires_gradient_sync(last)
    elif placed.ddp and not last:
        return placed.forward.no_sync()
    return contextlib.nullcontext()


def grad_norm(model: torch.nn.Module, clip: float) -> torch.Tensor:
    """The global gradient norm (clipped to `clip` when clip > 0), a 0-d tensor on the device: read on
    the host with the step's loss (_reduce_step), not on its own."""
    params = [p for p in model.parameters() if p.grad is not None]
    if clip > 0:
        norm = torch.nn.utils.clip_grad_norm_(params, clip)
    else:
        norm = torch.nn.utils.get_total_norm([p.grad for p in params])
    if hasattr(norm, "full_tensor"):  # a DTensor under FSDP
        norm = norm.full_tensor()
    return norm


def nonfinite_step(step: int, loss: float, norm: float | None, skipped: int, budget: int,
                   good: Path | None) -> tuple[int, str]:
    """The decision on a step whose loss or gradient norm is NaN/inf (its update was not applied).
    Returns the new count of skipped steps and a line to show, or raises once more than `budget`
    were skipped: the message names the last checkpoint whose weights gave a finite loss."""
    what = f"loss is {loss}" if not math.isfinite(loss) else f"gradient norm is {norm} (loss {loss:.4f})"
    skipped += 1
    if skipped > budget:
        where = f"; the last good checkpoint is {good}" if good else "; no checkpoint was saved yet"
        allowed = f" after skipping {budget} (--skip-nonfinite {budget})" if budget else ""
        raise UserError(f"{what} at step {step}: training stopped{allowed} "
                        f"(try a lower --lr, --dtype fp32, or --skip-nonfinite N){where}")
    return skipped, f"step {step}: {what}; update skipped ({skipped} of --skip-nonfinite {budget})"


class SpikeGuard:
    """--skip-spikes Z and --spike-rollback K: the decisions on loss spikes, and their state (saved in
    every checkpoint's TrainState, so a resumed run decides as the unbroken one).

    A step's loss is a spike when it is more than Z standard deviations above the mean of the last
    `window` applied steps' losses (a z-score, as llm.c's outlier detector); nothing is a spike
    before the window is full. A spike's update is skipped and the step is not added to the window.
    K spikes within `rollback_window` steps ask for a rollback (Trainer.rollback)."""

    def __init__(self, z: float, window: int, rollback_after: int = 0, rollback_window: int = 100):
        self.z, self.window = z, window
        self.rollback_after, self.rollback_window = rollback_after, rollback_window
        self.losses: list[float] = []
        """The recent applied steps' losses, oldest first (at most `window`)."""
        self.skipped = 0
        """Steps skipped as spikes, in all."""
        self.recent: list[int] = []
        """The steps skipped as spikes since the last rollback, within the rollback window."""
        self.rollbacks: list[dict] = []
        self.last_z: float | None = None
        """The z-score of the latest step checked."""

    @property
    def on(self) -> bool:
        return self.z > 0

    def zscore(self, loss: float) -> float | None:
        """How many standard deviations `loss` is above the window's mean; None until it is full."""
        if len(self.losses) < self.window:
            return None
        mean = math.fsum(self.losses) / len(self.losses)
        std = math.sqrt(math.fsum((x - mean) ** 2 for x in self.losses) / len(self.losses))
        if std == 0.0:
            return 0.0 if loss <= mean else math.inf
        return (loss - mean) / std

    def veto(self, loss: float) -> str | None:
        """train_step's veto: "spike" to keep this step's update out."""
        self.last_z = self.zscore(loss)
        return "spike" if self.last_z is not None and self.last_z > self.z else None

    def applied(self, loss: float) -> None:
        self.losses = (self.losses + [loss])[-self.window:]

    def spike(self, step: int) -> None:
        self.skipped += 1
        self.recent = [s for s in self.recent if s > step - self.rollback_window] + [step]

    def wants_rollback(self) -> bool:
        return self.rollback_after > 0 and len(self.recent) >= self.rollback_after

    def state(self) -> dict[str, Any]:
        """TrainState's fields."""
        return {"spike_losses": list(self.losses), "spike_skipped": self.skipped,
                "spike_recent": list(self.recent), "rollbacks": [dict(r) for r in self.rollbacks]}

    def load(self, state: TrainState) -> None:
        self.losses = [float(x) for x in state.spike_losses][-self.window:]
        self.skipped, self.recent = state.spike_skipped, list(state.spike_recent)
        self.rollbacks = [dict(r) for r in state.rollbacks]


@torch.no_grad()
def next_batch_loss(placed: Placed, rt: Runtime, loader: TrainLoader) -> float:
    """The loss the current weights give on the first micro-batch of the next step (mean over
    ranks), without moving the loader: eval mode, no gradients, no random numbers drawn. A
    checkpoint is only written when this is finite. Collective under DDP/FSDP."""
    x, y = loader.peek_batch()  # kept for the next step: the stream is not re-planned or re-fetched
    model = placed.model  # the parameters' owner; under FSDP its forward gathers the shards
    was_training = model.training
    model.eval()
    try:
        with rt.autocast():
            _, loss = model(x.to(rt.device), y.to(rt.device), return_logits=False)
    finally:
        model.train(was_training)
    loss = loss.detach().float().reshape(1)
    if not torch.isfinite(loss).all():
        loss.fill_(float("inf"))  # so that the mean over ranks is not finite either
    dist.all_reduce_mean(loss)
    return float(loss.item())


# ----------------------------------------------------------------------------- the batch-size search

def place_for_training(model: GPT, rt: Runtime, env: dist.DistEnv, compile_backend: str = "inductor") -> Placed:
    """parallel.place for a training run without FSDP. Under DDP the gradients are made first: DDP turns
    gradients that exist when it is built into views of its all-reduce buckets (gradient_as_bucket_view),
    and train_step zeroes them in place, so accumulation never holds a second copy, from the first step on
    (a gradient made under no_sync would be one until the next synchronised backward)."""
    if env.is_distributed:
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
    return place(model, rt, env, compile_backend=compile_backend)


def find_batch_size(placed: Placed, rt: Runtime, total_batch_tokens: int, env: dist.DistEnv,
                    probe: bool | None = None) -> int:
    """The largest micro-batch that divides this rank's share of the global batch and fits in memory,
    keeping the global batch by adjusting accumulation. The probe (on CUDA; `probe` overrides) runs
    train_step on the placed model itself: compiled, fused loss, DDP- or FSDP-wrapped, exactly what
    training runs, with AdamW's moments reserved. Memory is not the limit on a CPU, where it takes the
    largest divisor up to 16. Not even one sequence fitting is an error, not a silent 1.
    Compiled, each size tried is a static graph of its own (parallel.compile_model), fed distinct
    inputs and targets as training's batches are: the chosen size's graph is the one training runs,
    so the first step compiles nothing more (when the first size fits, the search is the only compile)."""
    T = placed.model.config.seq_len
    seqs = total_batch_tokens // (T * env.world_size)
    divisors = [b for b in range(seqs, 0, -1) if seqs % b == 0]
    if probe is None:
        probe = rt.device.type == "cuda"
    if not probe:
        return next(b for b in divisors if b <= 16)
    sizes = [d for d in divisors if d <= 1024]
    # every size tried must really compile (past dynamo's limit it would run eager, and so would training)
    limit = torch._dynamo.config.recompile_limit + len(sizes)
    with torch._dynamo.config.patch(recompile_limit=limit):
        for b in sizes:
            if _fits(placed, rt, env, b):
                return b
    raise UserError(f"--batch-size auto: not even one sequence of {T} tokens fits in {rt.device} memory "
                    f"with this model; try a shorter --seq-len, --fsdp or a smaller model")


def _reserve(placed: Placed, rt: Runtime) -> torch.Tensor:
    """AdamW's two fp32 moments for this rank's parameters (its shards under FSDP)."""
    n = sum(p.to_local().numel() if hasattr(p, "to_local") else p.numel() for p in placed.model.parameters())
    return torch.empty(2 * n, dtype=torch.float32, device=rt.device)


def _fits(placed: Placed, rt: Runtime, env: dist.DistEnv, b: int) -> bool:
    """Does a forward and backward of b sequences fit, on every rank?"""
    T, V = placed.model.config.seq_len, placed.model.config.vocab_size
    ok = torch.ones(1, device=rt.device)
    try:
        reserve = _reserve(placed, rt)  # inside the try: the reserve alone may not fit
        x = torch.randint(0, V, (b, T), device=rt.device)
        y = torch.randint(0, V, (b, T), device=rt.device)  # not x itself: compiled code guards on aliasing
        train_step(placed, rt, [(x, y)], accum=1)
        rt.synchronize()
        del reserve, x, y
    except torch.OutOfMemoryError:
        ok.zero_()
    placed.model.zero_grad(set_to_none=not placed.ddp)  # DDP's stay views of its buckets
    if rt.device.type == "cuda":
        torch.cuda.empty_cache()
    if env.is_distributed:
        ok = ok.neg()  # every rank must choose the same size: the minimum of the flags
        dist.all_reduce_max(ok)
        ok = ok.neg()
    return bool(ok.item() > 0)


# ----------------------------------------------------------------------------- model

def build_model(cfg: TrainConfig) -> GPT:
    """A fresh GPT-2 from the seed, or pretrained weights for fine-tuning (--init-from): the
    pretrained model decides the shape, and only its context may be shortened (--seq-len)."""
    if not cfg.init_from:
        torch.manual_seed(cfg.seed)
        return GPT(cfg.model_config())
    pretrained, _ = ckpt_mod.load_model(cfg.init_from, device="cpu")
    pre = pretrained.config
    for name in ("n_layer", "n_head", "n_embd", "vocab_size"):
        if getattr(cfg, name) is not None and getattr(cfg, name) != getattr(pre, name):
            raise UserError(f"--{name.replace('_', '-')} {getattr(cfg, name)}: --init-from {cfg.init_from} has "
                            f"{name} {getattr(pre, name)}, and the pretrained model decides the shape; drop the flag")
    seq = cfg.seq_len if cfg.seq_len is not None else pre.seq_len
    if seq > pre.seq_len:
        raise UserError(f"--seq-len {seq} is longer than the pretrained context {pre.seq_len}")
    if seq == pre.seq_len:
        return pretrained
    model = GPT(ModelConfig(**{**pre.to_dict(), "seq_len": seq}))
    sd = pretrained.state_dict()
    sd["transformer.wpe.weight"] = sd["transformer.wpe.weight"][:seq]  # keep the first T positions
    ckpt_mod.load_weights(model, sd, source=str(cfg.init_from))
    return model


def reads_text(model, cfg: TrainConfig, announce: bool, say) -> bool:
    """Whether the model's vocabulary holds its tokenizer's ids. A smaller one (--vocab-size, for
    data of small ids) cannot read text: samples are skipped, said once; text evaluations refused."""
    tok = model_tokenizer(model)
    if model.config.vocab_size >= tok.vocab_size:
        return True
    why = (f"the model's vocabulary of {model.config.vocab_size} (--vocab-size) is smaller than its "
           f"tokenizer's {tok.vocab_size:,} ids")
    if cfg.hellaswag or cfg.eval_tasks:
        raise UserError(f"--hellaswag and --eval-tasks score text, but {why}")
    if cfg.sample_tokens > 0 and announce:
        say(f"no samples: {why}")
    return False


def _model_tokenizer(cfg: TrainConfig, model, ckpt: Path | None) -> tuple:
    """The tokenizer the model being trained already has, and where it comes from."""
    if ckpt is not None:
        return read_model_dir_tokenizer(ckpt) or get_tokenizer(), f"the checkpoint {ckpt}"
    if cfg.init_from:
        return model_tokenizer(ckpt_mod.raw_model(model)), f"--init-from {cfg.init_from}"
    from gptlab.tokenizer import dataset_tokenizer

    return dataset_tokenizer(cfg.data), "the fresh model"


def _place_fsdp(cfg: TrainConfig, rt: Runtime, env: dist.DistEnv, ckpt: Path | None) -> Placed:
    """FSDP on the meta device (parallel.place_sharded). Full weights, where a run starts from some
    (--init-from, or a single-file checkpoint), are read by rank 0 alone and sent shard by shard;
    a sharded checkpoint is read by every rank in _restore."""
    full_state, init = None, True
    if ckpt is not None:
        model_cfg = ckpt_mod.read_model_config(ckpt)
        if not ckpt_mod.is_sharded_checkpoint(ckpt):
            full_state = lambda: ckpt_mod.load_model_dir(ckpt).state_dict()  # noqa: E731
        init = False  # every value comes from the checkpoint
    elif cfg.init_from:
        pretrained = [build_model(cfg) if env.is_main else None]
        shape = [pretrained[0].config.to_dict() if env.is_main else None]
        if env.is_distributed:  # (without, place_sharded says FSDP needs several processes)
            torch.distributed.broadcast_object_list(shape, src=0)  # the pretrained shape, to every rank
        model_cfg = ModelConfig.from_dict(shape[0])
        full_state = lambda: pretrained.pop().state_dict()  # noqa: E731
    else:
        model_cfg = cfg.model_config()
    return place_sharded(model_cfg, rt, env, cfg.seed, full_state, init, cfg.compile_backend)


# ----------------------------------------------------------------------------- the Trainer

class Trainer:
    """One training run: the placed model, its optimizers, data, checkpointer and logger, and the
    loop over them. Built (or restored from `ckpt`) by the constructor; train() runs it."""

    def __init__(self, cfg: TrainConfig, rt: Runtime, env: dist.DistEnv, run: RunDir, ckpt: Path | None):
        self.cfg, self.rt, self.env, self.run = cfg, rt, env, run
        self.placed = self._place(ckpt)
        model = self.model
        where = _model_tokenizer(cfg, model, ckpt)
        self.chat = bind_chat(ckpt_mod.raw_model(model), cfg.data, where[1])  # conversations: a chat model
        bind_data_tokenizer(ckpt_mod.raw_model(model), cfg.data, *where)
        self.val_tokenizer = val_tokenizer(ckpt_mod.raw_model(model), cfg.data)  # bits per byte, where known
        T = model.config.seq_len
        self.batch_size = cfg.batch_size
        if self.batch_size == "auto":
            grad_accum_steps(cfg, T, env.world_size, 1)  # the global batch must split into sequences
            self.batch_size = find_batch_size(self.placed, rt, cfg.total_batch_tokens, env)  # probes the placed model
        self.accum = grad_accum_steps(cfg, T, env.world_size, self.batch_size)
        self.loader = TrainLoader(cfg.data, seq_len=T, batch_size=self.batch_size, grad_accum=self.accum,
                                  rank=env.rank, world_size=env.world_size, seed=cfg.seed,
                                  cache=cfg.data_cache, disk_budget=cfg.data_disk_budget,
                                  model_vocab=model.config.vocab_size)
        # the next step's batches are cut by a thread while this one runs, pinned for an async copy
        self.loader.prefetch(pin_memory=rt.device.type == "cuda")
        self.steps = total_steps(cfg, self.loader)
        self.warmup = warmup_for(cfg, self.steps)
        design = PRESETS[cfg.model].seq_len if cfg.model in PRESETS else T
        if ckpt is None and T > design and env.is_main:  # (a resume keeps the run's own)
            self.say(f"warning: --seq-len {T} is {T / design:.3g}x the {cfg.model} preset's context of {design}: "
                     f"the position table grows to {T:,} x {model.config.n_embd} and attention costs "
                     f"{model.config.flops_per_token(T) / model.config.flops_per_token(design):.3g}x the FLOPs a "
                     f"token; each step of {self.accum} x {self.batch_size} sequences of {T:,} tokens is slow")
        if ckpt is not None and ckpt_mod.checkpoint_step(ckpt) > self.steps:  # before config.json is rewritten
            raise UserError(f"{ckpt} is at step {ckpt_mod.checkpoint_step(ckpt)}, past the {self.steps} steps "
                            f"asked for (--max-steps, --max-tokens or --epochs); ask for more steps to continue the run")
        if ckpt is not None and env.is_main:  # before config.json is rewritten
            self._warn_rescaled(TrainConfig.from_dict(run.read_config()["train"]))
        if env.is_main:
            run.create()
            run.write_config(model.config.to_dict(), cfg.to_dict())
        dist.barrier()
        self.optimizers: list[torch.optim.Optimizer] = make_optimizers(model, cfg, rt.device.type)
        """[AdamW] or [AdamW, Muon] (optim.make_optimizers)"""
        self.scaler = torch.amp.GradScaler(rt.device.type) if rt.needs_grad_scaler else None
        self.checkpointer = Checkpointer(run, cfg.keep_checkpoints, env.rank, sharded=self.placed.fsdp)
        self.clock = RunClock()
        """Seconds in evaluation and checkpoints, and the wall-clock MFU, of the train records."""
        self.step = self.tokens = 0
        self.stop_agreed = False
        self.stop_flag: StopFlag | None = None
        """Whether any rank asked to stop, agreed in the latest step's all_reduce."""
        self.skipped = 0
        """Steps whose update a non-finite loss or gradient norm kept out (--skip-nonfinite)."""
        self.spikes = SpikeGuard(cfg.skip_spikes, cfg.spike_window, cfg.spike_rollback, cfg.spike_rollback_window)
        self.data_fp = None if is_remote(cfg.data) else data_fingerprint(cfg.data)  # streams are verified as fetched
        if ckpt is not None:
            self.restore(ckpt)
        else:
            torch.manual_seed(cfg.seed + env.rank)  # dropout masks differ across ranks
            random.seed(cfg.seed + env.rank)
        self.logger: MetricsLogger | None = None
        if env.is_main:
            self.logger = MetricsLogger(run, tensorboard=cfg.tensorboard, wandb=cfg.wandb,
                                        wandb_project=cfg.wandb_project, resume=ckpt is not None,
                                        resume_step=self.step if ckpt is not None else None,
                                        config={"model": model.config.to_dict(), "train": cfg.to_dict()})
            self._announce(model.num_params(), ckpt)
        self.reads_text = reads_text(ckpt_mod.raw_model(model), cfg, env.is_main and ckpt is None, self.say)
        self.hellaswag_path = self._find_hellaswag() if cfg.hellaswag else None
        self.tasks = _task_runner(cfg) if cfg.eval_tasks and env.is_main else None
        """harness.TaskRunner of --eval-tasks (rank 0), or None"""

    @property
    def model(self) -> GPT:
        return self.placed.model

    def _warn_rescaled(self, before: TrainConfig) -> None:
        """A resume that changes the run's length stretches or squeezes its lr schedule: say so."""
        steps = total_steps(before, self.loader)
        if steps == self.steps or self.cfg.schedule == "constant":
            return
        at = ckpt_mod.checkpoint_step(self.run.latest_checkpoint()) if self.run.latest_checkpoint() else 0

        def lr(total: int) -> float:
            return lr_at(at, schedule=self.cfg.schedule, max_lr=self.cfg.lr, total_steps=total,
                         warmup_steps=warmup_for(self.cfg, total), min_lr_ratio=self.cfg.min_lr_ratio,
                         decay_frac=self.cfg.decay_frac)
        self.say(f"warning: the run was {steps} steps and now is {self.steps}: its {self.cfg.schedule} "
                 f"learning-rate schedule is rescaled (at step {at}: lr {lr(steps):.3g} -> {lr(self.steps):.3g})")

    def say(self, msg: str) -> None:
        if self.env.is_main:
            tqdm.write(msg, file=sys.stderr)  # above the progress bar, which is on stderr too

    # ------------------------------------------------------------------ the loop

    def train(self) -> TrainResult:
        """Steps until the budget, a signal or (with --overfit-batch) a near-zero loss; evaluation and
        checkpoints at their intervals; plots at the end."""
        cfg = self.cfg
        last_loss = val_loss = stopped_by = None
        fixed = [self.loader.next_batch() for _ in range(self.accum)] if cfg.overfit_batch else None
        with StopFlag(announce=self.env.is_main) as stop, self._watchdog():
            self.stop_flag = stop  # read by train_step, agreed on in its all_reduce
            bar = progress_bar(self.steps, self.step, self.env.is_main)
            try:
                while self.step < self.steps:
                    last_loss = self.train_step(fixed, bar)
                    watchdog.beat()  # a step finished
                    self.checkpointer.poll()  # publish a background save that has finished
                    if cfg.overfit_batch and last_loss < 0.05:
                        self.say(f"step {self.step}: overfit loss {last_loss:.4f} is near zero: the model can learn")
                        break
                    last_step = self.step == self.steps
                    if self.should_validate(self.step, last_step):
                        val_loss = self.evaluate()
                        watchdog.beat()  # each phase between steps has the whole --stall-timeout
                    # ranks agree on the flag in the step's own all_reduce (a signal after it: the next
                    # step's); one process reads its own flag now
                    stop_now = self.stop_agreed if self.env.is_distributed else stop.signal is not None
                    if self.should_checkpoint(self.step, last_step) or stop_now:
                        self.save(wait=last_step or stop_now)
                        watchdog.beat()
                    if stop_now:
                        stopped_by = stop.signal or "a signal on another rank"
                        self.say(f"stopped by {stopped_by} at step {self.step}; checkpoint saved to "
                                 f"{self.checkpointer.last}. Continue with: gptlab train --out {self.run.path} --resume")
                        break
            finally:
                bar.close()
                self.loader.stop_prefetch()
                if self.logger is not None:
                    self.logger.close()
        if cfg.overfit_batch and self.checkpointer.last is None:
            self.save()
        self.checkpointer.wait()
        if self.env.is_main and stopped_by is None:
            try:
                plot_run(self.run.path)
            except UserError as e:
                print(f"gptlab train: plots skipped: {e}", file=sys.stderr)
        return TrainResult(run_dir=self.run.path, steps=self.step, final_loss=last_loss, val_loss=val_loss,
                           stopped_by=stopped_by, checkpoint=self.checkpointer.last)

    def _watchdog(self):
        """The stall watchdog of --stall-timeout over the loop (a no-op context when it is off)."""
        timeout = watchdog.timeout_for(self.cfg.stall_timeout, self.env.world_size)
        if timeout <= 0:
            return contextlib.nullcontext()
        return watchdog.Watchdog(timeout, self.run.path / "stalls", self.env.rank)

    def should_validate(self, step: int, last_step: bool = False) -> bool:
        return self.cfg.eval_every > 0 and (step % self.cfg.eval_every == 0 or last_step)

    def should_checkpoint(self, step: int, last_step: bool = False) -> bool:
        return (self.cfg.checkpoint_every > 0 and step % self.cfg.checkpoint_every == 0) or last_step

    def train_step(self, fixed: list | None, bar) -> float:
        """One optimizer step at the scheduled learning rate (train_step), its non-finite decision
        and its bookkeeping (step, tokens, one log record); returns its loss. This rank's stop flag
        (self.stop_flag) is agreed on with the step's loss: self.stop_agreed."""
        cfg = self.cfg
        t0 = time.time()
        # the schedule as a factor of each group's own peak (--lr for AdamW, --muon-lr for Muon)
        factor = lr_at(self.step, schedule=cfg.schedule, max_lr=1.0, total_steps=self.steps,
                       warmup_steps=self.warmup, min_lr_ratio=cfg.min_lr_ratio, decay_frac=cfg.decay_frac)
        scale_lr(self.optimizers, factor)
        self.placed.forward.train()
        batches = fixed if fixed is not None else (self.loader.next_batch() for _ in range(self.accum))
        out = train_step(self.placed, self.rt, batches, self.accum, self.optimizers, self.scaler, cfg.grad_clip,
                         veto=self.spikes.veto if self.spikes.on else None,
                         stop=self.stop_flag is not None and self.stop_flag.signal is not None)
        self.stop_agreed = out.stop
        if out.skip_reason == "nonfinite":  # no update was applied; skip it or stop
            self.skipped, note = nonfinite_step(self.step + 1, out.loss, out.grad_norm, self.skipped,
                                                cfg.skip_nonfinite, self.checkpointer.last_good())
            self.say(note)
        elif out.skip_reason == "spike":  # no update was applied
            self.spikes.spike(self.step + 1)
            self.say(f"step {self.step + 1}: loss {out.loss:.4f} is a spike, {self.spikes.last_z:.1f} standard "
                     f"deviations above the mean of the last {cfg.spike_window} steps (--skip-spikes "
                     f"{cfg.skip_spikes:g}); update skipped")
        elif self.spikes.on:
            self.spikes.applied(out.loss)
        # no synchronize: the step's one host sync (_reduce_step) paces the loop, so the time from
        # step to step is the device's
        self.step += 1
        self.tokens += cfg.total_batch_tokens
        self._log_step(out, factor, time.time() - t0, bar)
        if self.spikes.wants_rollback():
            self.rollback()
        return out.loss

    def _log_step(self, out: StepResult, factor: float, dt: float, bar) -> None:
        """One train record: `lr` is AdamW's rate this step; a Muon run adds `muon_lr`, Muon's."""
        if self.logger is None:
            return
        lr = self.cfg.lr * factor
        muon = {"muon_lr": self.cfg.muon_lr * factor} if self.cfg.optimizer == "muon" else {}
        tok_s = self.cfg.total_batch_tokens / dt if dt > 0 else 0.0
        peak = self.rt.peak_flops()
        mcfg = self.model.config
        mfu = mcfg.flops_per_token(mcfg.seq_len) * tok_s / (peak * self.env.world_size) if peak else None
        clock = self.clock.step_fields(dt, self.cfg.total_batch_tokens, mcfg.flops_per_token(mcfg.seq_len),
                                       peak * self.env.world_size if peak else None)
        self.logger.log({"step": self.step, "kind": "train", "loss": out.loss, "lr": lr, "grad_norm": out.grad_norm,
                         "tokens": self.tokens, "tok_per_s": tok_s, "mfu": mfu, **clock, "time": time.time(),
                         "epoch": self.loader.epoch, **muon, **self._skip_fields(out)})
        post = {"loss": f"{out.loss:.4f}", "lr": f"{lr:.2e}", "tok/s": f"{tok_s:,.0f}"}
        if mfu is not None:
            post["mfu"] = f"{100 * mfu:.1f}%"
        bar.set_postfix(post, refresh=False)
        bar.update(1)

    def _skip_fields(self, out: StepResult) -> dict:
        if out.applied:
            return {}
        extra = {"spike_z": self.spikes.last_z} if out.skip_reason == "spike" else {}
        return {"skipped": True, "skip_reason": out.skip_reason, **extra}

    # ------------------------------------------------------------------ loss spikes: rollback

    def rollback(self) -> None:
        """--spike-rollback: K spikes within the window. Back to the newest checkpoint written on the
        --checkpoint-every schedule before the first of them (only those: a run stopped by a signal
        and resumed, which also saved where it stopped, picks the same one): its weights, optimizer,
        loss scale, RNG states and spike window. The step count, the tokens seen and the data loader
        go on where they are, so the batches since that checkpoint, the ones that caused the spikes
        among them, are not trained on again: their updates are discarded. Collective; every rank
        decides alike (the losses are the means over ranks)."""
        recent, step = list(self.spikes.recent), self.step
        self.checkpointer.wait()  # a background save in flight is complete before the choice
        target = self._rollback_target(min(recent))
        self.spikes.recent = []  # these spikes are dealt with, whether or not a checkpoint is there
        shown = ", ".join(map(str, recent))
        if target is None:
            self.say(f"step {step}: {len(recent)} loss spikes within {self.cfg.spike_rollback_window} steps "
                     f"(steps {shown}), but no scheduled checkpoint before step {recent[0]} to roll back to; "
                     f"going on")
            self._log({"step": step, "kind": "rollback", "tokens": self.tokens, "skips": recent, "checkpoint": None})
            return
        ckpt, at = target
        state = self._load_checkpoint(ckpt, weights=True)
        self.spikes.losses = [float(x) for x in state.spike_losses][-self.spikes.window:]
        record = {"step": step, "checkpoint_step": at, "skips": recent, "discarded": [at + 1, step]}
        self.spikes.rollbacks.append(record)
        self._log({**record, "kind": "rollback", "tokens": self.tokens, "checkpoint": ckpt.name})
        self.say(f"step {step}: {len(recent)} loss spikes within {self.cfg.spike_rollback_window} steps (steps "
                 f"{shown}): rolled back to {ckpt} (the weights of step {at}); the batches and updates of steps "
                 f"{at + 1}-{step} are discarded, training goes on with the next batch")

    def _rollback_target(self, first_spike: int) -> tuple[Path, int] | None:
        """The newest checkpoint of this run saved on the --checkpoint-every schedule (any, without one)
        at a step before `first_spike`, and its step. Checkpoints that an earlier rollback discarded
        (saved after its checkpoint and before it) are not candidates."""
        every, best = self.cfg.checkpoint_every, None
        gone = [(r["checkpoint_step"], r["step"]) for r in self.spikes.rollbacks]
        for ckpt in self.run.checkpoints():
            at = ckpt_mod.checkpoint_step(ckpt)
            if (at < first_spike and (every == 0 or at % every == 0) and not any(a < at < b for a, b in gone)
                    and (best is None or at > best[1])):
                best = (ckpt, at)
        if best is not None and self.placed.fsdp and not ckpt_mod.is_sharded_checkpoint(best[0]):
            self.say(f"{best[0]} is a single-file checkpoint: an FSDP run rolls back to sharded ones only")
            return None
        return best

    # ------------------------------------------------------------------ checkpoints

    def save(self, wait: bool = True) -> Path | None:
        """A checkpoint of this step (collective: see Checkpointer.save), only if its weights give a
        finite loss on the next batch: a checkpoint kept as good never holds weights that an
        exploding update made. Returns the newest good checkpoint. Timed (checkpoint_s)."""
        with self.clock.timing("checkpoint"):
            return self._save(wait)

    def _save(self, wait: bool) -> Path | None:
        loss = next_batch_loss(self.placed, self.rt, self.loader)
        if not math.isfinite(loss):
            good = self.checkpointer.last_good()
            msg = (f"step {self.step}: not checkpointed, its weights give a loss of {loss} on the next batch; "
                   + (f"the last good checkpoint is {good}" if good is not None else
                      "no good checkpoint was saved before it (try a lower --lr)"))
            if self.step == self.steps or self.cfg.overfit_batch:
                raise UserError(msg)  # no later step will be saved
            self.say(msg)
            return self.checkpointer.last
        state = TrainState(step=self.step, tokens=self.tokens, nonfinite_skipped=self.skipped,
                           data_fingerprint=self.data_fp, loader=self.loader.state_dict(),
                           grad_scaler=self.scaler.state_dict() if self.scaler is not None else None,
                           config={"model": self.model.config.to_dict(), "train": self.cfg.to_dict()},
                           world_size=self.env.world_size, rng=ckpt_mod.all_rng_states(), **self.spikes.state())
        return self.checkpointer.save(self.step, self.model, self.optimizers, state, wait=wait)

    def restore(self, ckpt: Path) -> None:
        """Optimizer, data position, step, loss scale, spike detector and RNG states from a checkpoint."""
        state = self._load_checkpoint(ckpt)
        self.loader.load_state_dict(state.loader)
        self.step, self.tokens, self.skipped = state.step, state.tokens, state.nonfinite_skipped
        self.spikes.load(state)

    def _load_checkpoint(self, ckpt: Path, weights: bool = False) -> TrainState:
        """A checkpoint's optimizer, loss scale and RNG states loaded (and its single-file weights with
        `weights`; sharded ones always); returns its TrainState for the rest."""
        sharded = ckpt_mod.is_sharded_checkpoint(ckpt)
        shapes = None if sharded else {n: tuple(p.shape) for n, p in self.model.named_parameters()}
        state, opt_tensors = ckpt_mod.read_train_state(ckpt, param_shapes=shapes)  # checked, or refused
        if state.data_fingerprint not in (None, self.data_fp):
            raise UserError(f"{self.cfg.data} holds other data than this run was trained on (content fingerprint "
                            f"{self.data_fp}, saved {state.data_fingerprint}); resume with the original data")
        if sharded:  # weights and optimizer, resharded to this world size
            ckpt_mod.load_sharded_checkpoint(ckpt, self.model, self.optimizers, state.to_json())
        else:
            if weights:  # in place: DDP, the compiled wrapper and the optimizers keep the same tensors
                ckpt_mod.load_checkpoint_weights(ckpt, self.model)
            load_optimizer(self.placed, self.optimizers, ckpt_mod.optimizer_from_files(opt_tensors, state.optimizer))
        if self.scaler is not None and state.grad_scaler:
            self.scaler.load_state_dict(state.grad_scaler)
        state.restore_rng(self.env.rank, self.env.world_size, self.cfg.seed)
        return state

    # ------------------------------------------------------------------ set-up

    def _place(self, ckpt: Path | None) -> Placed:
        """The model, built or read from `ckpt`, placed: FSDP (no full model on any rank), else
        DDP or one process. Sharded weights are read once placed (restore)."""
        cfg = self.cfg
        if cfg.fsdp:
            return _place_fsdp(cfg, self.rt, self.env, ckpt)
        if ckpt is not None:
            model = GPT(ckpt_mod.read_model_config(ckpt))
            if not ckpt_mod.is_sharded_checkpoint(ckpt):
                ckpt_mod.load_checkpoint_weights(ckpt, model)
        else:
            model = build_model(cfg)
        return place_for_training(model, self.rt, self.env, compile_backend=cfg.compile_backend)

    def _announce(self, n_params: int, ckpt: Path | None) -> None:
        cfg, T, world = self.cfg, self.model.config.seq_len, self.env.world_size
        if cfg.batch_size == "auto":
            print(f"gptlab train: --batch-size auto chose {self.batch_size}", file=sys.stderr)
        print(f"gptlab train: {n_params / 1e6:.2f}M parameters, {self.rt.describe()}, {world} rank(s)",
              file=sys.stderr)
        print(f"gptlab train: {self.steps} steps of {cfg.total_batch_tokens:,} tokens "
              f"(batch {self.batch_size} x seq {T} x accum {self.accum} x ranks {world}); "
              f"{self.loader.tokens_per_epoch:,} train tokens per epoch; run dir {self.run.path}", file=sys.stderr)
        rows = getattr(self.loader, "_windows", None)
        if self.chat is not None and rows is not None and hasattr(rows, "padding"):
            print(f"gptlab train: chat data: {rows.count:,} conversations, one a row of {T} positions "
                  f"({rows.padding:.1%} padding; {rows.truncated:,} cut at {T + 1} tokens); "
                  f"loss on assistant tokens only", file=sys.stderr)
        if ckpt is not None:
            print(f"gptlab train: resumed from {ckpt} at step {self.step}", file=sys.stderr)

    def _find_hellaswag(self) -> Path | None:
        try:
            return hellaswag.find_hellaswag(self.cfg.hellaswag_file, download=False)
        except UserError as e:
            self.say(f"HellaSwag skipped during training: {e}")
            return None

    # ------------------------------------------------------------------ evaluation

    def evaluate(self) -> float | None:
        """Validation loss, HellaSwag and samples at this step, logged; returns the val loss. Timed
        (eval_s of the next train record)."""
        with self.clock.timing("eval"):
            return self._evaluate()

    def _evaluate(self) -> float | None:
        cfg, env, step, rt = self.cfg, self.env, self.step, self.rt
        self.model.eval()
        val_loss = None
        try:
            res = evaluate.evaluate_val_loss(self.model, self.loader.val_split(), device=rt.device, seq_len=self.model.config.seq_len,
                                             batch_size=self.batch_size, max_tokens=self._val_tokens(),
                                             autocast=rt.autocast, tokenizer=self.val_tokenizer,
                                             forward=self.placed.eval_forward())
            val_loss = res["loss"]
            bpb = {"bits_per_byte": res["bits_per_byte"]} if res.get("bits_per_byte") is not None else {}
            self._log({"step": step, "kind": "val", "loss": val_loss, "tokens": self.tokens,
                       "perplexity": res.get("perplexity"), "eval_tokens": res.get("tokens"), **bpb})
            self.say(f"step {step}: val loss {val_loss:.4f}"
                     + (f", {bpb['bits_per_byte']:.4f} bits per byte" if bpb else ""))
        except UserError as e:
            self.say(f"step {step}: val loss skipped: {e}")
        if self.hellaswag_path is not None:  # every rank takes part (under FSDP each forward is a collective)
            hs = hellaswag.evaluate_hellaswag(self.model, self.hellaswag_path, device=rt.device, limit=cfg.hellaswag_limit,
                                              batch_size=max(1, self.batch_size // 4), autocast=rt.autocast,
                                              show_progress=False)
            self._log({"step": step, "kind": "hellaswag", "tokens": self.tokens,
                       "completion": hs["completion"], "harness": hs["harness"]})
            self.say(f"step {step}: hellaswag acc_norm {hs['completion']['acc_norm']:.4f} (completion), "
                     f"{hs['harness']['acc_norm']:.4f} (harness), n={hs['completion']['n']}")
        if cfg.eval_tasks:
            self._evaluate_tasks()
        if cfg.sample_tokens > 0 and (env.is_main or cfg.fsdp) and self.reads_text:
            # under FSDP every rank takes part in the sharded forward passes; rank 0 writes
            self._write_samples()
        self.model.train()
        return val_loss

    def _log(self, record: dict) -> None:
        if self.logger is not None:
            self.logger.log(record)

    def _evaluate_tasks(self) -> None:
        """--eval-tasks on rank 0 (the harness runs in one process), logged as a "tasks" record; the
        other ranks wait for it."""
        def run_tasks() -> None:
            if self.tasks is None:
                return
            metrics = self.tasks.run_during_training(ckpt_mod.raw_model(self.model), self.rt.device,
                                                     self.rt.dtype_name)
            self._log({"step": self.step, "kind": "tasks", "tokens": self.tokens, "tasks": metrics})
            for task, row in metrics.items():
                shown = ", ".join(f"{k} {v:.4f}" for k, v in row.items() if "stderr" not in k)
                self.say(f"step {self.step}: {task}: {shown}")

        dist.rank0_only("eval-tasks", run_tasks)  # the others wait outside any collective (no --dist-timeout)

    def _val_tokens(self) -> int:
        """Validation tokens per evaluation. A sharded forward is a collective, so under FSDP every rank
        must run the same number of batches: round down to whole rounds over the ranks."""
        if not self.cfg.fsdp:
            return self.cfg.eval_tokens
        T, per_round = self.model.config.seq_len, self.env.world_size * self.batch_size
        n = val_windows(self.loader.val_split(), seq_len=T, max_tokens=self.cfg.eval_tokens)
        n = n // per_round * per_round
        if n == 0:
            raise UserError(f"the val split has fewer than {per_round} windows for FSDP")
        return n * T

    def _write_samples(self) -> None:
        tok = model_tokenizer(ckpt_mod.raw_model(self.model))
        # sampling has its own generator: it never touches the training RNG
        gen = torch.Generator(device=self.rt.device).manual_seed(self.cfg.seed + self.step)
        lines = [f"=== step {self.step} ==="]
        with warnings.catch_warnings(), self.rt.autocast():  # in the run's compute dtype, as it trains
            warnings.simplefilter("ignore")  # a tiny context may not hold the whole sample: that is fine here
            for prompt in SAMPLE_PROMPTS:
                ids = [tok.eot] + tok.encode(prompt)
                for new in generate_ids(self.model, ids, num_samples=self.cfg.num_samples,
                                        max_new_tokens=self.cfg.sample_tokens, temperature=1.0, top_k=50,
                                        generator=gen):
                    if new and new[-1] == tok.eot:
                        new = new[:-1]
                    lines.append(prompt + tok.decode(new))
                    lines.append("---")
        if self.env.is_main:
            with open(self.run.samples_path, "a", encoding="utf-8") as f:
                f.write("\n".join(lines) + "\n")


# ----------------------------------------------------------------------------- the entry point

def train(cfg: TrainConfig, resume: bool | str = False, resume_flags: dict[str, Any] | None = None) -> TrainResult:
    """Train a GPT-2 as `cfg` says. With resume, cfg.out names the run to continue. With
    resume="auto", cfg is the run as a new one and resume_flags its settings: the run in cfg.out is
    continued when it holds a complete checkpoint (the flags checked as resume_config does), else
    started as cfg says."""
    if resume not in (False, True, "auto"):
        raise ValueError(f"resume={resume!r}: False, True or 'auto'")
    if resume is not True:  # (a resume trains with the run's own config)
        cfg.check_recipe()
    run = RunDir(cfg.out)
    if resume is True and not run.has_config():
        raise UserError(f"{run.path}: nothing to resume (no {run.config_path.name}); start it without --resume")
    env = dist.env_from_torchrun()
    if env.is_main:
        run.lock()  # one writer per run directory, until this process ends
    try:
        cfg, ckpt = _resolve_run(cfg, run, resume, resume_flags or {}, env.is_main)
        rt = get_runtime(cfg.device, cfg.dtype, cfg.compile)
        if rt.device.type == "cpu":
            reuse_freed_host_memory()  # no page faults for each step's gradients and activations
        env = dist.init(rt.device.type, timeout_s=cfg.dist_timeout)
        rt.device = env.device(rt.device)
        try:
            return Trainer(cfg, rt, env, run, ckpt).train()
        finally:
            dist.shutdown()
    finally:
        run.unlock()


def _resolve_run(cfg: TrainConfig, run: RunDir, resume: bool | str, flags: dict[str, Any],
                 is_main: bool = True) -> tuple[TrainConfig, Path | None]:
    """The configuration to train with and the checkpoint to start from (None: a new run)."""
    if resume == "auto":
        # Every rank decides before dist.init, and no checkpoint can appear before every rank has
        # joined the first step, so all ranks decide alike. Killed before its first complete save,
        # the run starts again (its temporaries and logs are cleared below).
        resume = run.latest_checkpoint() is not None
    if resume:
        cfg = resume_config(run, flags)
        ckpt = run.latest_checkpoint()
        if ckpt is None:
            raise UserError(f"{run.path}: no complete checkpoint to resume from")
    else:
        ckpt = None
        if run.latest_checkpoint() is not None:
            raise UserError(f"{run.path} already holds a run with checkpoints; add --resume to continue it, "
                            f"or choose another --out")
    validate(cfg)
    if not is_remote(cfg.data) and not Path(cfg.data).exists():
        raise UserError(f"{cfg.data}: no such data directory; prepare one with `gptlab prepare shakespeare`")
    if not is_remote(cfg.data):
        cfg.data = os.path.abspath(cfg.data)  # config.json must work from any directory
    if cfg.eval_include_path is not None:
        cfg.eval_include_path = os.path.abspath(cfg.eval_include_path)
    if is_main:  # we hold the lock
        run.remove_stale_temps()  # what a killed save left behind
        if ckpt is None:
            run.start_fresh_logs()  # not appended to a log of deleted checkpoints
    return cfg, ckpt


def _task_runner(cfg: TrainConfig):
    """--eval-tasks checked before the first step: the harness installed, every task known."""
    tasks = [t.strip() for t in cfg.eval_tasks.split(",") if t.strip()]
    if not tasks:
        raise UserError("--eval-tasks needs at least one task name (T1,T2)")
    if cfg.eval_include_path is not None and not Path(cfg.eval_include_path).is_dir():
        raise UserError(f"{cfg.eval_include_path}: no such task directory (--eval-include-path)")
    harness = require_extra("gptlab.harness", "eval", "--eval-tasks needs lm-evaluation-harness")
    return harness.TaskRunner(tasks, include_path=cfg.eval_include_path, limit=cfg.eval_tasks_limit or None)


# ----------------------------------------------------------------------------- gptlab.train(...)

class _CallableModule(types.ModuleType):
    """This module, callable: `gptlab.train(model="tiny", max_steps=20, out="runs/x")` trains from
    Python as `gptlab train` does (the preset's defaults, then the fields given), and
    `gptlab.train(cfg)` trains a TrainConfig; the module's names stay where they are."""

    def __call__(self, cfg: TrainConfig | None = None, /, *, resume: bool | str = False, **fields: Any) -> TrainResult:
        if cfg is None:
            cfg = TrainConfig.for_model(**fields)
        elif fields:
            raise TypeError("gptlab.train takes a TrainConfig or its fields as keywords, not both")
        return train(cfg, resume=resume)


sys.modules[__name__].__class__ = _CallableModule
