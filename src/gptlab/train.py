"""train(cfg): build -> compile -> wrap -> loop, with evaluation, checkpoints, metrics and plots.

A run directory holds everything (see DESIGN). A run stopped by SIGTERM/SIGINT saves a checkpoint
at the current step boundary; `resume=True` continues it exactly: same weights, optimizer state,
data position, RNG states, schedule and step count.
"""

from __future__ import annotations

import contextlib
import math
import random
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from gptlab import checkpoint as ckpt_mod
from gptlab import dist
from gptlab.config import (DATA_FIELDS, MODEL_FIELDS, ModelConfig, TrainConfig, read_json, write_json)
from gptlab.data.stream import is_remote
from gptlab.errors import UserError
from gptlab.model import GPT
from gptlab.optim import SCHEDULES, lr_at, make_adamw, set_lr
from gptlab.metrics import progress_bar
from gptlab.runtime import Runtime, get_runtime

SAMPLE_PROMPTS = ("Hello, I'm a language model,", "The meaning of life is")
RUN_CONFIG = "config.json"
SAMPLES_FILE = "samples.txt"


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
    """Micro-steps per optimizer step, with a message that says which numbers divide."""
    batch_size = cfg.batch_size if batch_size is None else batch_size
    per_micro = batch_size * seq_len * world_size
    if cfg.total_batch_tokens % per_micro != 0:
        total = cfg.total_batch_tokens
        if total % (seq_len * world_size) != 0:
            raise UserError(
                f"--total-batch-tokens {total} is not a multiple of seq_len x ranks = {seq_len} x "
                f"{world_size} = {seq_len * world_size}; try {max(1, total // (seq_len * world_size)) * seq_len * world_size}"
            )
        seqs = total // (seq_len * world_size)  # sequences per rank per step
        options = [b for b in range(1, seqs + 1) if seqs % b == 0]
        shown = ", ".join(str(b) for b in options if b <= 1024)
        raise UserError(
            f"--batch-size {batch_size} does not divide the global batch: {total} tokens = "
            f"{seqs} sequences of {seq_len} per rank over {world_size} rank(s); use a batch size in: {shown}"
        )
    return cfg.total_batch_tokens // per_micro


def validate(cfg: TrainConfig) -> None:
    checks = [
        (cfg.batch_size == "auto" or (isinstance(cfg.batch_size, int) and cfg.batch_size > 0),
         "--batch-size must be a positive integer or 'auto'"),
        (cfg.total_batch_tokens > 0, "--total-batch-tokens must be positive"),
        (cfg.lr > 0, "--lr must be positive"),
        (0 <= cfg.min_lr_ratio <= 1, "--min-lr-ratio must be in [0, 1]"),
        (cfg.schedule in SCHEDULES, f"--schedule must be one of {', '.join(SCHEDULES)}"),
        (cfg.warmup_steps >= 0, "--warmup-steps must be >= 0"),
        (cfg.warmup_frac is None or 0 <= cfg.warmup_frac < 1, "--warmup-frac must be in [0, 1)"),
        (0 < cfg.decay_frac <= 1, "--decay-frac must be in (0, 1]"),
        (cfg.max_steps is None or cfg.max_steps > 0, "--max-steps must be positive"),
        (cfg.max_tokens is None or cfg.max_tokens > 0, "--max-tokens must be positive"),
        (cfg.epochs is None or cfg.epochs > 0, "--epochs must be positive"),
        (cfg.eval_every >= 0, "--eval-every must be >= 0"),
        (cfg.checkpoint_every >= 0, "--checkpoint-every must be >= 0"),
        (cfg.keep_checkpoints >= 0, "--keep-checkpoints must be >= 0"),
        (cfg.grad_clip >= 0, "--grad-clip must be >= 0"),
        (cfg.eval_tokens > 0, "--eval-tokens must be positive"),
        (cfg.sample_tokens >= 0, "--sample-tokens must be >= 0"),
        (cfg.num_samples > 0, "--num-samples must be positive"),
    ]
    for ok, msg in checks:
        if not ok:
            raise UserError(msg)


def total_steps(cfg: TrainConfig, loader) -> int:
    if cfg.max_tokens is not None:
        return max(1, math.ceil(cfg.max_tokens / cfg.total_batch_tokens))
    if cfg.epochs is not None:
        return max(1, math.ceil(cfg.epochs * loader.tokens_per_epoch / cfg.total_batch_tokens))
    assert cfg.max_steps is not None
    return cfg.max_steps


def warmup_for(cfg: TrainConfig, steps: int) -> int:
    if cfg.warmup_frac is not None:
        return int(round(cfg.warmup_frac * steps))
    return cfg.warmup_steps


def resume_config(run_dir: Path, flags: dict[str, Any]) -> TrainConfig:
    """The run's own config, with the flags given alongside --resume applied where they are safe."""
    saved = read_json(run_dir / RUN_CONFIG)
    if "train" not in saved:
        raise UserError(f"{run_dir / RUN_CONFIG}: not a gptlab run config")
    base = TrainConfig.from_dict(saved["train"])
    for name, value in flags.items():
        if value is None or name in ("out",):
            continue
        if getattr(base, name) == value:
            continue
        if name in MODEL_FIELDS:
            raise UserError(f"--{name.replace('_', '-')} would change the model of a run being resumed "
                            f"({getattr(base, name)!r} -> {value!r}); start a new run with another --out instead")
        if name in DATA_FIELDS:
            raise UserError(f"--{name.replace('_', '-')} would change the data order of a run being resumed "
                            f"({getattr(base, name)!r} -> {value!r}); start a new run with another --out instead")
        setattr(base, name, value)
    base.out = str(run_dir)
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


# ----------------------------------------------------------------------------- the loop

def train(cfg: TrainConfig, resume: bool = False, resume_flags: dict[str, Any] | None = None) -> TrainResult:
    """Train a GPT-2 as `cfg` says. With resume, cfg.out names the run to continue."""
    run_dir = Path(cfg.out)
    if resume:
        if not (run_dir / RUN_CONFIG).is_file():
            raise UserError(f"{run_dir}: nothing to resume (no {RUN_CONFIG}); start it without --resume")
        cfg = resume_config(run_dir, resume_flags or {})
        ckpt = ckpt_mod.latest_checkpoint(run_dir)
        if ckpt is None:
            raise UserError(f"{run_dir}: no complete checkpoint to resume from")
    else:
        ckpt = None
        if ckpt_mod.latest_checkpoint(run_dir) is not None:
            raise UserError(f"{run_dir} already holds a run with checkpoints; add --resume to continue it, "
                            f"or choose another --out")
    validate(cfg)
    if not is_remote(cfg.data) and not Path(cfg.data).exists():
        raise UserError(f"{cfg.data}: no such data directory; prepare one with `gptlab prepare shakespeare`")

    rt = get_runtime(cfg.device, cfg.dtype, cfg.compile)
    env = dist.init(rt.device.type, timeout_s=cfg.dist_timeout)
    if env.is_distributed and rt.device.type == "cuda":
        rt.device = torch.device("cuda", env.local_rank)
    try:
        return _train(cfg, rt, env, run_dir, ckpt)
    finally:
        dist.shutdown()


def _train(cfg: TrainConfig, rt: Runtime, env: dist.DistEnv, run_dir: Path, ckpt: Path | None) -> TrainResult:
    from gptlab.data.loader import TrainLoader
    from tqdm.auto import tqdm

    if ckpt is not None:
        model = GPT(ckpt_mod.read_model_config(ckpt))
        ckpt_mod.load_checkpoint_weights(ckpt, model)
    else:
        model = build_model(cfg)
    model_cfg = model.config
    T = model_cfg.seq_len
    batch_size = cfg.batch_size
    if batch_size == "auto":
        batch_size = find_batch_size(model_cfg, rt, cfg, env)
        if env.is_main:
            print(f"gptlab train: --batch-size auto chose {batch_size}", file=sys.stderr)
    accum = grad_accum_steps(cfg, T, env.world_size, batch_size)
    loader = TrainLoader(cfg.data, seq_len=T, batch_size=batch_size, grad_accum=accum,
                         rank=env.rank, world_size=env.world_size, seed=cfg.seed,
                         cache=cfg.data_cache, disk_budget=cfg.data_disk_budget)
    steps = total_steps(cfg, loader)
    warmup = warmup_for(cfg, steps)

    if env.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_json(run_dir / RUN_CONFIG, {"model": model_cfg.to_dict(), "train": cfg.to_dict()})
    dist.barrier()

    start_step, tokens_seen, state = 0, 0, {}
    if cfg.fsdp and not env.is_distributed:
        raise UserError("--fsdp shards over several processes: launch with torchrun or --nproc N")
    model.to(rt.device)
    n_params = sum(p.numel() for p in model.parameters())
    if cfg.fsdp:
        shard_model(model, rt)
    optimizer = make_adamw(model, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(cfg.beta1, cfg.beta2),
                           eps=cfg.eps, device_type=rt.device.type)
    scaler = torch.amp.GradScaler(rt.device.type) if rt.needs_grad_scaler else None
    if ckpt is not None:
        state, opt_tensors = ckpt_mod.load_checkpoint_state(ckpt)
        if opt_tensors is not None and "optimizer" in state:
            load_optimizer(model, optimizer, ckpt_mod.optimizer_from_files(opt_tensors, state["optimizer"]))
        loader.load_state_dict(state["loader"])
        start_step, tokens_seen = int(state["step"]), int(state["tokens"])
        if scaler is not None and state.get("grad_scaler"):
            scaler.load_state_dict(state["grad_scaler"])
        # RNG states are per rank; a resume on another world size reseeds the extra ranks
        rngs = state.get("rng", [])
        if env.rank < len(rngs) and state.get("world_size") == env.world_size:
            set_rng_state(rngs[env.rank])
        else:
            torch.manual_seed(cfg.seed + env.rank + start_step)
    else:
        torch.manual_seed(cfg.seed + env.rank)  # dropout masks differ across ranks
        random.seed(cfg.seed + env.rank)

    flops_per_token = model_cfg.flops_per_token(T)
    peak = rt.peak_flops()
    train_model: torch.nn.Module = model
    if rt.compile:
        train_model = torch.compile(model)
    if env.is_distributed and not cfg.fsdp:
        from torch.nn.parallel import DistributedDataParallel as DDP

        train_model = DDP(train_model, device_ids=[rt.device.index] if rt.device.type == "cuda" else None)

    logger = None
    if env.is_main:
        from gptlab.metrics import MetricsLogger

        logger = MetricsLogger(run_dir, tensorboard=cfg.tensorboard, wandb=cfg.wandb,
                               wandb_project=cfg.wandb_project, resume=ckpt is not None,
                               config={"model": model_cfg.to_dict(), "train": cfg.to_dict()})
    def say(msg: str) -> None:
        if env.is_main:
            tqdm.write(msg, file=sys.stderr)  # above the progress bar, which is on stderr too
    if env.is_main:
        print(f"gptlab train: {n_params / 1e6:.2f}M parameters, {rt.describe()}, {env.world_size} rank(s)",
              file=sys.stderr)
        print(f"gptlab train: {steps} steps of {cfg.total_batch_tokens:,} tokens "
              f"(batch {batch_size} x seq {T} x accum {accum} x ranks {env.world_size}); "
              f"{loader.tokens_per_epoch:,} train tokens per epoch; run dir {run_dir}", file=sys.stderr)
        if ckpt is not None:
            print(f"gptlab train: resumed from {ckpt} at step {start_step}", file=sys.stderr)

    hellaswag_path = _find_hellaswag(cfg, say) if cfg.hellaswag else None
    overfit_batches: list | None = None
    last_loss: float | None = None
    val_loss: float | None = None
    stopped_by: str | None = None
    saved: Path | None = None
    step = start_step
    bar = None

    def save(step_done: int) -> Path | None:
        weights, opt_state = gather_state(model, optimizer, cfg.fsdp)
        st = {
            "step": step_done,
            "tokens": tokens_seen,
            "loader": loader.state_dict(),
            "grad_scaler": scaler.state_dict() if scaler is not None else None,
            "config": {"model": model_cfg.to_dict(), "train": cfg.to_dict()},
            "world_size": env.world_size,
        }
        # every rank's RNG state, so a same-size resume is exact on every rank
        local = rng_state()
        rngs = [local]
        if env.is_distributed:
            rngs = [None] * env.world_size
            torch.distributed.all_gather_object(rngs, local)
        st["rng"] = rngs
        path = None
        if env.is_main:
            path = ckpt_mod.save_checkpoint(run_dir, step_done, model, opt_state, st, keep=cfg.keep_checkpoints,
                                            weights=weights)
        dist.barrier()
        return path

    with StopFlag() as stop:
        bar = progress_bar(steps, start_step, env.is_main)
        try:
            while step < steps:
                t0 = time.time()
                lr = lr_at(step, schedule=cfg.schedule, max_lr=cfg.lr, total_steps=steps,
                           warmup_steps=warmup, min_lr_ratio=cfg.min_lr_ratio, decay_frac=cfg.decay_frac)
                set_lr(optimizer, lr)
                train_model.train()
                loss_sum = torch.zeros((), device=rt.device, dtype=torch.float32)
                if cfg.overfit_batch and overfit_batches is None:
                    overfit_batches = [loader.next_batch() for _ in range(accum)]
                for micro in range(accum):
                    x, y = overfit_batches[micro] if overfit_batches is not None else loader.next_batch()
                    x, y = x.to(rt.device, non_blocking=True), y.to(rt.device, non_blocking=True)
                    sync = micro == accum - 1
                    ctx = contextlib.nullcontext()
                    if env.is_distributed and cfg.fsdp:
                        model.set_requires_gradient_sync(sync)
                    elif env.is_distributed and not sync:
                        ctx = train_model.no_sync()  # all-reduce gradients once, after the last micro-step
                    with ctx:
                        with rt.autocast():
                            # uncompiled, the output layer's loss is fused and chunked (model.FusedHeadLoss)
                            _, loss = train_model(x, y, return_logits=rt.compile)
                        loss = loss / accum
                        loss_sum += loss.detach()
                        if scaler is not None:
                            scaler.scale(loss).backward()
                        else:
                            loss.backward()
                dist.all_reduce_mean(loss_sum)
                if scaler is not None:
                    scaler.unscale_(optimizer)
                if cfg.grad_clip > 0:
                    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                else:
                    grad_norm = torch.linalg.vector_norm(
                        torch.stack([p.grad.norm() for p in model.parameters() if p.grad is not None]))
                loss_val = float(loss_sum.item())
                if not math.isfinite(loss_val):
                    optimizer.zero_grad(set_to_none=True)
                    good = saved or ckpt_mod.latest_checkpoint(run_dir)
                    where = f"; the last good checkpoint is {good}" if good else ""
                    raise UserError(f"loss is {loss_val} at step {step + 1}: training stopped "
                                    f"(try a lower --lr or --dtype fp32){where}")
                if scaler is not None:
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                rt.synchronize()
                step += 1
                tokens_seen += cfg.total_batch_tokens
                dt = time.time() - t0
                tok_s = cfg.total_batch_tokens / dt if dt > 0 else 0.0
                mfu = (flops_per_token * tok_s / (peak * env.world_size)) if peak else None
                last_loss = loss_val
                if logger is not None:
                    logger.log({"step": step, "kind": "train", "loss": loss_val, "lr": lr,
                                "grad_norm": _to_float(grad_norm), "tokens": tokens_seen, "tok_per_s": tok_s,
                                "mfu": mfu, "time": time.time(), "epoch": loader.epoch})
                    post = {"loss": f"{loss_val:.4f}", "lr": f"{lr:.2e}", "tok/s": f"{tok_s:,.0f}"}
                    if mfu is not None:
                        post["mfu"] = f"{100 * mfu:.1f}%"
                    bar.set_postfix(post, refresh=False)
                    bar.update(1)

                if cfg.overfit_batch and loss_val < 0.05:
                    say(f"step {step}: overfit loss {loss_val:.4f} is near zero: the model can learn")
                    break

                last = step == steps
                if cfg.eval_every > 0 and (step % cfg.eval_every == 0 or last):
                    val_loss = _evaluate(cfg, model, rt, env, run_dir, step, tokens_seen, logger, say,
                                         hellaswag_path, T)
                stop_now = _agree_to_stop(stop.signal is not None, env)
                if (cfg.checkpoint_every > 0 and step % cfg.checkpoint_every == 0) or last or stop_now:
                    saved = save(step)
                if stop_now:
                    stopped_by = stop.signal or "a signal on another rank"
                    say(f"stopped by {stopped_by} at step {step}; checkpoint saved to {saved}. "
                        f"Continue with: gptlab train --out {run_dir} --resume")
                    break
        finally:
            bar.close()
            if logger is not None:
                logger.close()

    if cfg.overfit_batch and saved is None:
        saved = save(step)
    if env.is_main and stopped_by is None:
        try:
            from gptlab.plot import plot_run

            plot_run(run_dir)
        except UserError as e:
            print(f"gptlab train: plots skipped: {e}", file=sys.stderr)
    return TrainResult(run_dir=run_dir, steps=step, final_loss=last_loss, val_loss=val_loss,
                       stopped_by=stopped_by, checkpoint=saved)


def find_batch_size(model_cfg: ModelConfig, rt: Runtime, cfg: TrainConfig, env: dist.DistEnv) -> int:
    """The largest micro-batch that divides this rank's share of the global batch and fits in memory
    (GPU), keeping the global batch by adjusting accumulation. Memory is not the limit on a CPU,
    where it takes the largest divisor up to 16."""
    T = model_cfg.seq_len
    if cfg.total_batch_tokens % (T * env.world_size) != 0:
        grad_accum_steps(cfg, T, env.world_size, 1)  # raises the explanatory error
    seqs = cfg.total_batch_tokens // (T * env.world_size)
    divisors = [b for b in range(seqs, 0, -1) if seqs % b == 0]
    if rt.device.type != "cuda":
        return next(b for b in divisors if b <= 16)
    probe = GPT(model_cfg).to(rt.device)
    n_params = sum(p.numel() for p in probe.parameters())
    # AdamW keeps two fp32 moments per parameter; reserve them while probing
    reserve = torch.empty(2 * n_params, dtype=torch.float32, device=rt.device)
    chosen = 1
    try:
        for b in [d for d in divisors if d <= 1024]:
            ok = torch.ones(1, device=rt.device)
            try:
                x = torch.randint(0, model_cfg.vocab_size, (b, T), device=rt.device)
                with rt.autocast():
                    _, loss = probe(x, x)
                loss.backward()
                rt.synchronize()
            except torch.OutOfMemoryError:
                ok.zero_()
            probe.zero_grad(set_to_none=True)
            loss = x = None
            torch.cuda.empty_cache()
            if env.is_distributed:
                # every rank must choose the same size
                ok = ok.neg()
                dist.all_reduce_max(ok)
                ok = ok.neg()
            if ok.item() > 0:
                chosen = b
                break
    finally:
        del reserve, probe
        torch.cuda.empty_cache()
    return chosen


def shard_model(model: GPT, rt: Runtime) -> None:
    """FSDP2: shard each block, then the rest (embeddings, final norm); parameters become DTensors."""
    import warnings

    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    # the model returns a view of the logits (real vocab only); FSDP2 warns about in-place ops on it
    warnings.filterwarnings("ignore", message=".*returned a view tensor.*")
    kw = {}
    if rt.dtype != torch.float32:
        kw["mp_policy"] = MixedPrecisionPolicy(param_dtype=rt.dtype, reduce_dtype=torch.float32)
    for block in model.transformer.h:
        fully_shard(block, **kw)
    fully_shard(model, **kw)


def _state_options():
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=True)


def gather_state(model: GPT, optimizer: torch.optim.Optimizer, fsdp: bool):
    """Full model weights (FSDP only; None means read them from the module) and the optimizer state
    keyed by parameter name, the same for DDP, FSDP and one process. Collective under FSDP."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    weights = get_model_state_dict(model, options=_state_options()) if fsdp else None
    return weights, get_optimizer_state_dict(model, optimizer, options=_state_options())


def load_optimizer(model: GPT, optimizer: torch.optim.Optimizer, full_state: dict) -> None:
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    # the saving device's implementation choices must not override this device's
    keep = [{k: g.get(k) for k in ("fused", "foreach", "capturable")} for g in optimizer.param_groups]
    set_optimizer_state_dict(model, optimizer, full_state, options=_state_options())
    for g, kept in zip(optimizer.param_groups, keep):
        g.update(kept)


def _to_float(t) -> float:
    if hasattr(t, "full_tensor"):  # a DTensor under FSDP
        t = t.full_tensor()
    return float(t)


def _agree_to_stop(local: bool, env: dist.DistEnv) -> bool:
    if not env.is_distributed:
        return local
    flag = torch.tensor([1.0 if local else 0.0])
    if dist.is_initialized() and torch.distributed.get_backend() == "nccl":
        flag = flag.cuda()
    dist.all_reduce_max(flag)
    return bool(flag.item() > 0)


def _find_hellaswag(cfg: TrainConfig, say) -> Path | None:
    from gptlab.evaluate import find_hellaswag

    try:
        return find_hellaswag(cfg.hellaswag_file, download=False)
    except UserError as e:
        say(f"HellaSwag skipped during training: {e}")
        return None


def _evaluate(cfg: TrainConfig, model: GPT, rt: Runtime, env: dist.DistEnv, run_dir: Path, step: int,
              tokens: int, logger, say, hellaswag_path: Path | None, T: int) -> float | None:
    from gptlab import evaluate

    model.eval()
    val_loss = None
    batch = cfg.batch_size if isinstance(cfg.batch_size, int) else 16
    max_tokens = cfg.eval_tokens
    if cfg.fsdp:
        # a sharded forward is a collective: every rank must run the same number of batches
        from gptlab.data.loader import val_windows

        n = val_windows(cfg.data, seq_len=T, max_tokens=cfg.eval_tokens)
        n = n // (env.world_size * batch) * (env.world_size * batch)
        max_tokens = n * T
    try:
        if max_tokens == 0:
            raise UserError(f"the val split has fewer than {env.world_size * batch} windows for FSDP")
        res = evaluate.evaluate_val_loss(model, cfg.data, device=rt.device, seq_len=T, batch_size=batch,
                                         max_tokens=max_tokens, autocast=rt.autocast)
        val_loss = res["loss"]
        if logger is not None:
            logger.log({"step": step, "kind": "val", "loss": val_loss, "tokens": tokens,
                        "perplexity": res.get("perplexity"), "eval_tokens": res.get("tokens")})
        say(f"step {step}: val loss {val_loss:.4f}")
    except UserError as e:
        say(f"step {step}: val loss skipped: {e}")
    if hellaswag_path is not None and cfg.fsdp:
        say(f"step {step}: HellaSwag is not run inside FSDP training; use `gptlab eval {run_dir} --hellaswag`")
    elif hellaswag_path is not None:
        hs = evaluate.evaluate_hellaswag(model, hellaswag_path, device=rt.device, limit=cfg.hellaswag_limit,
                                         batch_size=max(1, batch // 4), autocast=rt.autocast,
                                         show_progress=False)
        if logger is not None:
            logger.log({"step": step, "kind": "hellaswag", "tokens": tokens,
                        "completion": hs["completion"], "harness": hs["harness"]})
        say(f"step {step}: hellaswag acc_norm {hs['completion']['acc_norm']:.4f} (completion), "
            f"{hs['harness']['acc_norm']:.4f} (harness), n={hs['completion']['n']}")
    if cfg.sample_tokens > 0 and (env.is_main or cfg.fsdp):
        # under FSDP every rank takes part in the sharded forward passes; rank 0 writes
        _write_samples(cfg, model, rt, run_dir, step, write=env.is_main)
    model.train()
    return val_loss


def _write_samples(cfg: TrainConfig, model: GPT, rt: Runtime, run_dir: Path, step: int, write: bool = True) -> None:
    import warnings

    from gptlab.generate import generate_ids
    from gptlab.tokenizer import get_tokenizer

    tok = get_tokenizer()
    # sampling has its own generator: it never touches the training RNG
    gen = torch.Generator(device=rt.device).manual_seed(cfg.seed + step)
    lines = [f"=== step {step} ==="]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a tiny context may not hold the whole sample: that is fine here
        for prompt in SAMPLE_PROMPTS:
            ids = [tok.eot] + tok.encode(prompt)
            for new in generate_ids(model, ids, num_samples=cfg.num_samples, max_new_tokens=cfg.sample_tokens,
                                    temperature=1.0, top_k=50, generator=gen):
                if new and new[-1] == tok.eot:
                    new = new[:-1]
                lines.append(prompt + tok.decode(new))
                lines.append("---")
    if write:
        with open(run_dir / SAMPLES_FILE, "a", encoding="utf-8") as f:
            f.write("\n".join(lines) + "\n")
