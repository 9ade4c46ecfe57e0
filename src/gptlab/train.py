"""train(cfg): set up -> a loop of train_step -> evaluate, checkpoint, log; then plots.

A run directory holds everything (see DESIGN). A run stopped by SIGTERM/SIGINT saves a checkpoint
at the current step boundary; `resume=True` continues it exactly: same weights, optimizer state,
data position, RNG states, schedule and step count.
"""

from __future__ import annotations

import math
import os
import random
import signal
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from gptlab import checkpoint as ckpt_mod
from gptlab import dist, evaluate, guards, hellaswag
from gptlab.atomic import DiskFullError
from gptlab.config import DATA_FIELDS, MODEL_FIELDS, ModelConfig, TrainConfig
from gptlab.data.loader import TrainLoader, val_windows
from gptlab.data.stream import is_remote
from gptlab.errors import UserError, require_extra
from gptlab.generate import generate_ids
from gptlab.metrics import MetricsLogger, progress_bar
from gptlab.model import GPT
from gptlab.optim import OPTIMIZERS, SCHEDULES, lr_at, make_optimizers, scale_lr
from gptlab.parallel import (Placed, find_batch_size, gather_state, load_optimizer, place, place_sharded,
                             train_step)
from gptlab.plot import plot_run
from gptlab.rundir import RunDir
from gptlab.runtime import Runtime, get_runtime
from gptlab.tokenizer import get_tokenizer

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

    def __init__(self) -> None:
        self.signal: str | None = None
        self._old: dict[int, Any] = {}

    def _handler(self, signum, frame) -> None:
        if self.signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C means now
        self.signal = signal.Signals(signum).name

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


# ----------------------------------------------------------------------------- RNG state

def rng_state() -> dict:
    state = {
        "torch": torch.get_rng_state().tolist(),
        "python": _py_state_to_json(random.getstate()),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    random.setstate(_py_state_from_json(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        cuda = [torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]]
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)


def _py_state_to_json(s) -> list:
    version, internal, gauss = s
    return [version, list(internal), gauss]


def _py_state_from_json(s) -> tuple:
    version, internal, gauss = s
    return (version, tuple(internal), gauss)


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
        if getattr(base, name) == value or (name == "data" and guards.same_path(base.data, value)):
            continue
        if name in MODEL_FIELDS:
            raise UserError(f"--{name.replace('_', '-')} would change the model of a run being resumed "
                            f"({getattr(base, name)!r} -> {value!r}); start a new run with another --out instead")
        if name == "optimizer":  # the checkpoint holds the other optimizer's state
            raise UserError(f"--optimizer {value} would change the optimizer of a run being resumed "
                            f"(it trains with {base.optimizer}); start a new run with another --out instead")
        if name in DATA_FIELDS:
            raise UserError(f"--{name.replace('_', '-')} would change the data order of a run being resumed "
                            f"({getattr(base, name)!r} -> {value!r}); start a new run with another --out instead")
        setattr(base, name, value)
    base.out = str(run.path)
    return base


# ----------------------------------------------------------------------------- model

def build_model(cfg: TrainConfig) -> GPT:
    """A fresh GPT-2 from the seed, or pretrained weights for fine-tuning (--init-from): the
    pretrained model decides the shape, and only its context may be shortened (--seq-len)."""
    if not cfg.init_from:
        torch.manual_seed(cfg.seed)
        return GPT(cfg.model_config())
    pretrained, _ = ckpt_mod.load_model(cfg.init_from, device="cpu")
    pre = pretrained.config
    for name in ("n_layer", "n_head", "n_embd"):
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


# ----------------------------------------------------------------------------- the loop

@dataclass
class Session:
    """Everything one training run holds while it runs."""

    cfg: TrainConfig
    rt: Runtime
    env: dist.DistEnv
    run: RunDir
    placed: Placed
    optimizers: list[torch.optim.Optimizer]
    """[AdamW] or [AdamW, Muon] (optim.make_optimizers)"""
    scaler: torch.amp.GradScaler | None
    loader: TrainLoader
    batch_size: int
    accum: int
    steps: int
    warmup: int
    step: int = 0
    tokens: int = 0
    logger: MetricsLogger | None = None
    hellaswag_path: Path | None = None
    tasks: Any = None
    """harness.TaskRunner of --eval-tasks (rank 0), or None"""
    saved: Path | None = None
    saver: ckpt_mod.ShardedSaver | None = None
    skipped: int = 0
    """Steps whose update a non-finite loss or gradient norm kept out (--skip-nonfinite)."""
    data_fp: str | None = None

    @property
    def model(self) -> GPT:
        return self.placed.model

    def say(self, msg: str) -> None:
        if self.env.is_main:
            tqdm.write(msg, file=sys.stderr)  # above the progress bar, which is on stderr too


def train(cfg: TrainConfig, resume: bool | str = False, resume_flags: dict[str, Any] | None = None) -> TrainResult:
    """Train a GPT-2 as `cfg` says. With resume, cfg.out names the run to continue. With
    resume="auto", cfg is the run as a new one and resume_flags its settings: the run in cfg.out is
    continued when it holds a complete checkpoint (the flags checked as resume_config does), else
    started as cfg says."""
    if resume not in (False, True, "auto"):
        raise ValueError(f"resume={resume!r}: False, True or 'auto'")
    run = RunDir(cfg.out)
    if resume is True and not run.has_config():
        raise UserError(f"{run.path}: nothing to resume (no {run.config_path.name}); start it without --resume")
    env = dist.env_from_torchrun()
    if env.is_main:
        run.lock()  # one writer per run directory, until this process ends
    try:
        cfg, ckpt = _resolve_run(cfg, run, resume, resume_flags or {}, env.is_main)
        rt = get_runtime(cfg.device, cfg.dtype, cfg.compile)
        env = dist.init(rt.device.type, timeout_s=cfg.dist_timeout)
        rt.device = env.device(rt.device)
        try:
            return _loop(_setup(cfg, rt, env, run, ckpt))
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


def _setup(cfg: TrainConfig, rt: Runtime, env: dist.DistEnv, run: RunDir, ckpt: Path | None) -> Session:
    """Build (or restore) the model, the data, the optimizer and the logger."""
    placed = None
    if cfg.fsdp:
        placed = _place_fsdp(cfg, rt, env, ckpt)  # no full model on any rank
        model = placed.model
    elif ckpt is not None:
        model = GPT(ckpt_mod.read_model_config(ckpt))
        if not ckpt_mod.is_sharded_checkpoint(ckpt):  # sharded weights are read once placed (_restore)
            ckpt_mod.load_checkpoint_weights(ckpt, model)
    else:
        model = build_model(cfg)
    T = model.config.seq_len
    n_params = model.num_params()
    if placed is None:
        placed = place(model, rt, env, compile_backend=cfg.compile_backend)
    batch_size = cfg.batch_size
    if batch_size == "auto":
        grad_accum_steps(cfg, T, env.world_size, 1)  # the global batch must split into sequences
        batch_size = find_batch_size(placed, rt, cfg.total_batch_tokens, env)  # probes the placed model
    accum = grad_accum_steps(cfg, T, env.world_size, batch_size)
    loader = TrainLoader(cfg.data, seq_len=T, batch_size=batch_size, grad_accum=accum,
                         rank=env.rank, world_size=env.world_size, seed=cfg.seed,
                         cache=cfg.data_cache, disk_budget=cfg.data_disk_budget)
    steps = total_steps(cfg, loader)
    if ckpt is not None and ckpt_mod.checkpoint_step(ckpt) > steps:  # before config.json is rewritten
        raise UserError(f"{ckpt} is at step {ckpt_mod.checkpoint_step(ckpt)}, past the {steps} steps asked for "
                        f"(--max-steps, --max-tokens or --epochs); ask for more steps to continue the run")
    if env.is_main:
        run.create()
        run.write_config(model.config.to_dict(), cfg.to_dict())
    dist.barrier()
    optimizers = make_optimizers(model, cfg, rt.device.type)
    scaler = torch.amp.GradScaler(rt.device.type) if rt.needs_grad_scaler else None
    s = Session(cfg, rt, env, run, placed, optimizers, scaler, loader, batch_size, accum, steps,
                warmup_for(cfg, steps),
                data_fp=None if is_remote(cfg.data) else guards.data_fingerprint(cfg.data))  # streams are verified as fetched
    if ckpt is not None:
        _restore(s, ckpt)
    else:
        torch.manual_seed(cfg.seed + env.rank)  # dropout masks differ across ranks
        random.seed(cfg.seed + env.rank)
    if env.is_main:
        s.logger = MetricsLogger(run, tensorboard=cfg.tensorboard, wandb=cfg.wandb,
                                 wandb_project=cfg.wandb_project, resume=ckpt is not None,
                                 resume_step=s.step if ckpt is not None else None,
                                 config={"model": model.config.to_dict(), "train": cfg.to_dict()})
        _announce(s, n_params, ckpt)
    s.hellaswag_path = _find_hellaswag(s) if cfg.hellaswag else None
    s.tasks = _task_runner(cfg) if cfg.eval_tasks and env.is_main else None
    return s


def _task_runner(cfg: TrainConfig):
    """--eval-tasks checked before the first step: the harness installed, every task known."""
    tasks = [t.strip() for t in cfg.eval_tasks.split(",") if t.strip()]
    if not tasks:
        raise UserError("--eval-tasks needs at least one task name (T1,T2)")
    if cfg.eval_include_path is not None and not Path(cfg.eval_include_path).is_dir():
        raise UserError(f"{cfg.eval_include_path}: no such task directory (--eval-include-path)")
    harness = require_extra("gptlab.harness", "eval", "--eval-tasks needs lm-evaluation-harness")
    return harness.TaskRunner(tasks, include_path=cfg.eval_include_path, limit=cfg.eval_tasks_limit or None)


def _restore(s: Session, ckpt: Path) -> None:
    """Optimizer, data position, step, loss scale and RNG states from a checkpoint."""
    sharded = ckpt_mod.is_sharded_checkpoint(ckpt)
    shapes = None if sharded else {n: tuple(p.shape) for n, p in s.model.named_parameters()}
    state, opt_tensors = ckpt_mod.load_checkpoint_state(ckpt, param_shapes=shapes)  # checked, or refused
    if state.get("data_fingerprint", s.data_fp) != s.data_fp:
        raise UserError(f"{s.cfg.data} holds other data than this run was trained on (content fingerprint "
                        f"{s.data_fp}, saved {state['data_fingerprint']}); resume with the original data")
    if sharded:  # weights and optimizer, resharded to this world size
        ckpt_mod.load_sharded_checkpoint(ckpt, s.placed.model, s.optimizers[0], state)  # AdamW alone
    else:
        load_optimizer(s.placed, s.optimizers, ckpt_mod.optimizer_from_files(opt_tensors, state["optimizer"]))
    s.loader.load_state_dict(state["loader"])
    s.step, s.tokens = state["step"], state["tokens"]
    s.skipped = state.get("nonfinite_skipped", 0)
    if s.scaler is not None and state.get("grad_scaler"):
        s.scaler.load_state_dict(state["grad_scaler"])
    # RNG states are per rank; a resume on another world size reseeds the extra ranks
    rngs = state.get("rng", [])
    if s.env.rank < len(rngs) and state.get("world_size") == s.env.world_size:
        set_rng_state(rngs[s.env.rank])
    else:
        torch.manual_seed(s.cfg.seed + s.env.rank + s.step)


def _announce(s: Session, n_params: int, ckpt: Path | None) -> None:
    cfg, T = s.cfg, s.model.config.seq_len
    if cfg.batch_size == "auto":
        print(f"gptlab train: --batch-size auto chose {s.batch_size}", file=sys.stderr)
    print(f"gptlab train: {n_params / 1e6:.2f}M parameters, {s.rt.describe()}, {s.env.world_size} rank(s)",
          file=sys.stderr)
    print(f"gptlab train: {s.steps} steps of {cfg.total_batch_tokens:,} tokens "
          f"(batch {s.batch_size} x seq {T} x accum {s.accum} x ranks {s.env.world_size}); "
          f"{s.loader.tokens_per_epoch:,} train tokens per epoch; run dir {s.run.path}", file=sys.stderr)
    if ckpt is not None:
        print(f"gptlab train: resumed from {ckpt} at step {s.step}", file=sys.stderr)


def _loop(s: Session) -> TrainResult:
    """Steps until the budget, a signal or (with --overfit-batch) a near-zero loss; evaluation and
    checkpoints at their intervals; plots at the end."""
    cfg = s.cfg
    last_loss: float | None = None
    val_loss: float | None = None
    stopped_by: str | None = None
    fixed = [s.loader.next_batch() for _ in range(s.accum)] if cfg.overfit_batch else None
    with StopFlag() as stop:
        bar = progress_bar(s.steps, s.step, s.env.is_main)
        try:
            while s.step < s.steps:
                last_loss = _step(s, fixed, bar)
                if s.saver is not None:
                    s.saver.poll()  # publish a background save that has finished
                if cfg.overfit_batch and last_loss < 0.05:
                    s.say(f"step {s.step}: overfit loss {last_loss:.4f} is near zero: the model can learn")
                    break
                last = s.step == s.steps
                if cfg.eval_every > 0 and (s.step % cfg.eval_every == 0 or last):
                    val_loss = _evaluate(s)
                stop_now = _agree_to_stop(stop.signal is not None, s.env)
                if (cfg.checkpoint_every > 0 and s.step % cfg.checkpoint_every == 0) or last or stop_now:
                    s.saved = _save(s, wait=last or stop_now)
                if stop_now:
                    stopped_by = stop.signal or "a signal on another rank"
                    s.say(f"stopped by {stopped_by} at step {s.step}; checkpoint saved to {s.saved}. "
                          f"Continue with: gptlab train --out {s.run.path} --resume")
                    break
        finally:
            bar.close()
            if s.logger is not None:
                s.logger.close()
    if cfg.overfit_batch and s.saved is None:
        s.saved = _save(s)
    if s.saver is not None:
        s.saver.wait()
    if s.env.is_main and stopped_by is None:
        try:
            plot_run(s.run.path)
        except UserError as e:
            print(f"gptlab train: plots skipped: {e}", file=sys.stderr)
    return TrainResult(run_dir=s.run.path, steps=s.step, final_loss=last_loss, val_loss=val_loss,
                       stopped_by=stopped_by, checkpoint=s.saved)


def _step(s: Session, fixed: list | None, bar) -> float:
    """One optimizer step at the scheduled learning rate, logged; returns its loss."""
    cfg = s.cfg
    t0 = time.time()
    # the schedule as a factor of each group's own peak (--lr for AdamW, --muon-lr for Muon)
    factor = lr_at(s.step, schedule=cfg.schedule, max_lr=1.0, total_steps=s.steps, warmup_steps=s.warmup,
                   min_lr_ratio=cfg.min_lr_ratio, decay_frac=cfg.decay_frac)
    scale_lr(s.optimizers, factor)
    lr = cfg.lr * factor
    s.placed.forward.train()
    batches = fixed if fixed is not None else (s.loader.next_batch() for _ in range(s.accum))
    out = train_step(s.placed, s.rt, batches, s.accum, s.optimizers, s.scaler, cfg.grad_clip)
    if not out.applied:  # a non-finite loss or norm: no update was applied; skip it or stop
        s.skipped, note = guards.nonfinite_step(s.step + 1, out.loss, out.grad_norm, s.skipped,
                                                cfg.skip_nonfinite, s.saved or s.run.latest_checkpoint())
        s.say(note)
    s.rt.synchronize()
    s.step += 1
    s.tokens += cfg.total_batch_tokens
    dt = time.time() - t0
    tok_s = cfg.total_batch_tokens / dt if dt > 0 else 0.0
    peak = s.rt.peak_flops()
    mfu = (s.model.config.flops_per_token(s.model.config.seq_len) * tok_s / (peak * s.env.world_size)
           if peak else None)
    if s.logger is not None:
        s.logger.log({"step": s.step, "kind": "train", "loss": out.loss, "lr": lr, "grad_norm": out.grad_norm,
                      "tokens": s.tokens, "tok_per_s": tok_s, "mfu": mfu, "time": time.time(),
                      "epoch": s.loader.epoch, **({} if out.applied else {"skipped": True})})
        post = {"loss": f"{out.loss:.4f}", "lr": f"{lr:.2e}", "tok/s": f"{tok_s:,.0f}"}
        if mfu is not None:
            post["mfu"] = f"{100 * mfu:.1f}%"
        bar.set_postfix(post, refresh=False)
        bar.update(1)
    return out.loss


def _save(s: Session, wait: bool = True) -> Path | None:
    """A checkpoint of this step (collective: every rank takes part, rank 0 writes; under FSDP every
    rank writes its shard, in the background unless `wait`), only if its weights give a finite loss
    on the next batch: a checkpoint kept as good never holds weights that an exploding update made.
    Returns the newest good checkpoint."""
    loss = guards.next_batch_loss(s.placed, s.rt, s.loader)
    if not math.isfinite(loss):
        good = s.saved or s.run.latest_checkpoint()
        msg = (f"step {s.step}: not checkpointed, its weights give a loss of {loss} on the next batch; "
               f"the last good checkpoint is {good}")
        if s.step == s.steps or s.cfg.overfit_batch:
            raise UserError(msg)  # no later step will be saved
        s.say(msg)
        return s.saved
    state = {
        "step": s.step,
        "tokens": s.tokens,
        "nonfinite_skipped": s.skipped,
        "data_fingerprint": s.data_fp,
        "loader": s.loader.state_dict(),
        "grad_scaler": s.scaler.state_dict() if s.scaler is not None else None,
        "config": {"model": s.model.config.to_dict(), "train": s.cfg.to_dict()},
        "world_size": s.env.world_size,
    }
    # every rank's RNG state, so a same-size resume is exact on every rank
    local = rng_state()
    rngs = [local]
    if s.env.is_distributed:
        rngs = [None] * s.env.world_size
        torch.distributed.all_gather_object(rngs, local)
    state["rng"] = rngs
    if s.placed.fsdp:
        if s.saver is None:
            s.saver = ckpt_mod.ShardedSaver(s.run, s.cfg.keep_checkpoints, s.env.rank)
        return s.saver.save(s.run.checkpoint_path(s.step), s.model, s.optimizers[0], state, wait=wait)  # AdamW alone
    weights, opt_state = gather_state(s.placed, s.optimizers)
    path = None
    if s.env.is_main:
        try:
            path = ckpt_mod.save_checkpoint(s.run.checkpoint_path(s.step), s.model, opt_state, state,
                                            weights=weights)
        except DiskFullError as e:
            good = s.saved or s.run.latest_checkpoint()
            raise UserError(f"{e}; step {s.step} was not checkpointed, the last checkpoint {good} is intact. "
                            f"Free some space, then continue with: gptlab train --out {s.run.path} --resume") from None
        s.run.mark_latest(path)
        s.run.prune(s.cfg.keep_checkpoints)
    dist.barrier()
    return path


def _agree_to_stop(local: bool, env: dist.DistEnv) -> bool:
    if not env.is_distributed:
        return local
    flag = torch.tensor([1.0 if local else 0.0])
    if dist.is_initialized() and torch.distributed.get_backend() == "nccl":
        flag = flag.cuda()
    dist.all_reduce_max(flag)
    return bool(flag.item() > 0)


def _find_hellaswag(s: Session) -> Path | None:
    try:
        return hellaswag.find_hellaswag(s.cfg.hellaswag_file, download=False)
    except UserError as e:
        s.say(f"HellaSwag skipped during training: {e}")
        return None


def _evaluate(s: Session) -> float | None:
    """Validation loss, HellaSwag and samples at this step, logged; returns the val loss."""
    cfg, env, step = s.cfg, s.env, s.step
    s.model.eval()
    val_loss = None
    try:
        res = evaluate.evaluate_val_loss(s.model, s.loader.val_split(), device=s.rt.device, seq_len=s.model.config.seq_len,
                                         batch_size=s.batch_size, max_tokens=_val_tokens(s),
                                         autocast=s.rt.autocast)
        val_loss = res["loss"]
        if s.logger is not None:
            s.logger.log({"step": step, "kind": "val", "loss": val_loss, "tokens": s.tokens,
                          "perplexity": res.get("perplexity"), "eval_tokens": res.get("tokens")})
        s.say(f"step {step}: val loss {val_loss:.4f}")
    except UserError as e:
        s.say(f"step {step}: val loss skipped: {e}")
    if s.hellaswag_path is not None:  # every rank takes part (under FSDP each forward is a collective)
        hs = hellaswag.evaluate_hellaswag(s.model, s.hellaswag_path, device=s.rt.device, limit=cfg.hellaswag_limit,
                                          batch_size=max(1, s.batch_size // 4), autocast=s.rt.autocast,
                                          show_progress=False)
        if s.logger is not None:
            s.logger.log({"step": step, "kind": "hellaswag", "tokens": s.tokens,
                          "completion": hs["completion"], "harness": hs["harness"]})
        s.say(f"step {step}: hellaswag acc_norm {hs['completion']['acc_norm']:.4f} (completion), "
              f"{hs['harness']['acc_norm']:.4f} (harness), n={hs['completion']['n']}")
    if cfg.eval_tasks:
        _evaluate_tasks(s)
    if cfg.sample_tokens > 0 and (env.is_main or cfg.fsdp):
        # under FSDP every rank takes part in the sharded forward passes; rank 0 writes
        _write_samples(s)
    s.model.train()
    return val_loss


def _evaluate_tasks(s: Session) -> None:
    """--eval-tasks on rank 0 (the harness runs in one process), logged as a "tasks" record; the
    other ranks wait for it."""
    if s.tasks is not None:
        metrics = s.tasks.run_during_training(ckpt_mod.raw_model(s.model), s.rt.device, s.rt.dtype_name)
        if s.logger is not None:
            s.logger.log({"step": s.step, "kind": "tasks", "tokens": s.tokens, "tasks": metrics})
        for task, row in metrics.items():
            shown = ", ".join(f"{k} {v:.4f}" for k, v in row.items() if "stderr" not in k)
            s.say(f"step {s.step}: {task}: {shown}")
    dist.barrier()


def _val_tokens(s: Session) -> int:
    """Validation tokens per evaluation. A sharded forward is a collective, so under FSDP every rank
    must run the same number of batches: round down to whole rounds over the ranks."""
    if not s.cfg.fsdp:
        return s.cfg.eval_tokens
    T = s.model.config.seq_len
    n = val_windows(s.loader.val_split(), seq_len=T, max_tokens=s.cfg.eval_tokens)
    n = n // (s.env.world_size * s.batch_size) * (s.env.world_size * s.batch_size)
    if n == 0:
        raise UserError(f"the val split has fewer than {s.env.world_size * s.batch_size} windows for FSDP")
    return n * T


def _cache_dtype(s: Session) -> torch.dtype | None:
    """Under FSDP with bf16/fp16 parameters, attention computes in that dtype, not in the fp32 of the
    sharded parameters: the KV cache must follow it. Otherwise the parameters' dtype (None)."""
    return s.rt.dtype if s.placed.fsdp and s.rt.dtype != torch.float32 else None


def _write_samples(s: Session) -> None:
    tok = get_tokenizer()
    # sampling has its own generator: it never touches the training RNG
    gen = torch.Generator(device=s.rt.device).manual_seed(s.cfg.seed + s.step)
    lines = [f"=== step {s.step} ==="]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a tiny context may not hold the whole sample: that is fine here
        for prompt in SAMPLE_PROMPTS:
            ids = [tok.eot] + tok.encode(prompt)
            for new in generate_ids(s.model, ids, num_samples=s.cfg.num_samples, max_new_tokens=s.cfg.sample_tokens,
                                    temperature=1.0, top_k=50, generator=gen, cache_dtype=_cache_dtype(s)):
                if new and new[-1] == tok.eot:
                    new = new[:-1]
                lines.append(prompt + tok.decode(new))
                lines.append("---")
    if s.env.is_main:
        with open(s.run.samples_path, "a", encoding="utf-8") as f:
            f.write("\n".join(lines) + "\n")
