"""Run logging: RUN/metrics.jsonl (one JSON object a line), the console progress bar, and
optional TensorBoard / Weights & Biases. Only rank 0 writes anything."""

from __future__ import annotations

import json
import math
import os
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from gptlab.atomic import disk_full_guard, write_text
from gptlab.errors import UserError
from gptlab.rundir import RunDir


def _clean(value: Any) -> Any:
    # JSON has no NaN/inf: write them as null
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    return value


def _record_step(line: str) -> int | None:
    """The step of one metrics line, or None if the line is not a whole, valid record."""
    try:
        rec = json.loads(line)
    except ValueError:
        return None
    step = rec.get("step") if isinstance(rec, dict) else None
    return step if isinstance(step, int) and not isinstance(step, bool) else None


def repair_metrics(path: Path, keep_through: int) -> int:
    """Make `path` hold exactly the records of steps <= keep_through, whole lines only: a line
    torn by a kill is dropped, and so are records of steps a resume will redo (they are logged
    again). Rewritten atomically; returns how many lines were dropped."""
    if not path.is_file():
        return 0
    lines = path.read_text(encoding="utf-8", errors="replace").split("\n")
    # split leaves "" after a final newline; any other last piece is a torn line
    kept = [ln for ln in lines if ln.strip() and (s := _record_step(ln)) is not None and s <= keep_through]
    dropped = sum(1 for ln in lines if ln.strip()) - len(kept)
    if dropped == 0 and (not lines or lines[-1] == ""):
        return 0
    write_text(path, "".join(ln + "\n" for ln in kept))
    return dropped


class MetricsLogger:
    """Appends records to RUN/metrics.jsonl and mirrors scalars to TensorBoard / W&B.

    One valid record per (step, kind), however often the run is killed and resumed: a new run
    starts a new file; a resume from step S first drops a torn last line and every record after S."""

    def __init__(self, run: RunDir, *, enabled: bool = True, tensorboard: bool = False,
                 wandb: bool = False, wandb_project: str = "gptlab", config: dict | None = None,
                 resume: bool = False, resume_step: int | None = None):
        self.enabled = enabled
        self.path = run.metrics_path
        self._file = None
        self._tb = None
        self._wandb = None
        if not enabled:
            return
        if resume and resume_step is not None:
            repair_metrics(self.path, resume_step)
        self._file = open(self.path, "a" if resume else "w", encoding="utf-8")
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise UserError("--tensorboard needs the tensorboard package: pip install 'gptlab[track]'") from None
            self._tb = SummaryWriter(log_dir=str(run.tensorboard_dir))
        if wandb:
            try:
                import wandb as wandb_mod
            except ImportError:
                raise UserError("--wandb needs the wandb package: pip install 'gptlab[track]'") from None
            self._wandb = wandb_mod.init(project=wandb_project, dir=str(run.path), config=config,
                                         name=run.path.name, resume="allow" if resume else None)

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = _clean(record)
        with disk_full_guard(self.path):
            self._file.write(json.dumps(record) + "\n")
            self._file.flush()
        step, kind = record.get("step", 0), record.get("kind", "train")
        scalars = {}
        for k, v in record.items():
            if k in ("step", "kind"):
                continue
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                scalars[f"{kind}/{k}"] = v
            elif isinstance(v, dict):
                for k2, v2 in v.items():
                    if isinstance(v2, dict):
                        for k3, v3 in v2.items():
                            if isinstance(v3, (int, float)):
                                scalars[f"{kind}/{k}/{k2}/{k3}"] = v3
                    elif isinstance(v2, (int, float)):
                        scalars[f"{kind}/{k}/{k2}"] = v2
        if self._tb is not None:
            for k, v in scalars.items():
                self._tb.add_scalar(k, v, step)
        if self._wandb is not None:
            self._wandb.log(scalars, step=step)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None


class RunClock:
    """Where this process's wall-clock time goes, for the train records: `eval_s` and
    `checkpoint_s` are the seconds spent in evaluation and in saving checkpoints since the first
    step of this process (cumulative; a resumed run starts again at 0), `wall_s` the seconds since
    that first step began. `mfu` counts a step's own time; `wall_mfu` divides the FLOPs of every
    step of this process by all of wall_s, so it also pays for evaluation, checkpoints and whatever
    else runs between the steps."""

    def __init__(self):
        self.eval_s = self.checkpoint_s = 0.0
        self.t0: float | None = None
        self.tokens = 0  # trained by this process since t0

    @contextmanager
    def timing(self, what: str):
        """Adds the block's seconds to eval_s ("eval") or checkpoint_s ("checkpoint")."""
        t = time.perf_counter()
        try:
            yield
        finally:
            setattr(self, f"{what}_s", getattr(self, f"{what}_s") + time.perf_counter() - t)

    def step_fields(self, dt: float, tokens: int, flops_per_token: float, peak_total: float | None) -> dict:
        """The record's clock fields after a step of `tokens` tokens that took dt seconds;
        peak_total: the FLOP/s of every rank together (None: no wall_mfu)."""
        now = time.perf_counter()
        if self.t0 is None:
            self.t0 = now - dt
        self.tokens += tokens
        wall = now - self.t0
        wall_mfu = flops_per_token * self.tokens / (wall * peak_total) if peak_total and wall > 0 else None
        return {"wall_mfu": wall_mfu, "eval_s": round(self.eval_s, 4), "checkpoint_s": round(self.checkpoint_s, 4),
                "wall_s": round(wall, 4)}


def bars_disabled() -> bool:
    """TQDM_DISABLE set (to anything but 0/false): no progress bar at all, e.g. in a notebook whose
    stored outputs should stay short. (tqdm reads it only where a caller passes no `disable`.)"""
    return os.environ.get("TQDM_DISABLE", "").strip().lower() not in ("", "0", "false")


def progress_bar(total: int, initial: int, enabled: bool, desc: str = "train"):
    """One tqdm bar for training steps on stderr (rank 0 only; none with TQDM_DISABLE)."""
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit="step", disable=not enabled or bars_disabled(),
                file=sys.stderr, dynamic_ncols=True, smoothing=0.1)
