"""What the charts draw, without drawing it: metrics.jsonl read and grouped, (x, y) series on the
chosen x axis (tokens, steps or wall-clock time), smoothing, and each optimizer's learning rate.

plot.py draws these with matplotlib; this module imports neither matplotlib nor torch.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any, Callable, Iterable

from gptlab.errors import UserError

X_AXES = ("tokens", "steps", "time")
_MAX_WARNINGS = 10


def warn(msg: str) -> None:
    print(f"gptlab plot: warning: {msg}", file=sys.stderr)


def number(value: Any) -> float | None:
    """A finite float, or None for null, missing, non-numeric, NaN or infinite values."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _malformed(rec: Any) -> str | None:
    if not isinstance(rec, dict):
        return "not a JSON object"
    if not isinstance(rec.get("kind"), str):
        return "no \"kind\""
    if number(rec.get("step")) is None:
        return "no numeric \"step\""
    return None


def read_metrics(path: str | Path) -> dict[str, list[dict[str, Any]]]:
    """Records of a metrics.jsonl grouped by kind, each list sorted by step.

    Blank lines are ignored; a malformed line (a run killed mid-write leaves a partial last
    line) is skipped with a warning naming its line number. A resumed run repeats steps: a
    record whose step is not after the previous one of its kind starts a new timeline, so it
    replaces the earlier records of that kind from its step on (the last record for a step wins).
    """
    path = Path(path)
    by_kind: dict[str, dict[int, dict[str, Any]]] = {}
    skipped = 0
    try:
        f = open(path, encoding="utf-8", errors="replace")
    except FileNotFoundError:
        raise UserError(f"{path}: no such file") from None
    except OSError as e:
        raise UserError(f"{path}: cannot read: {e}") from None
    with f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                reason = _malformed(rec)
            except json.JSONDecodeError as e:
                reason = f"not valid JSON: {e.msg}"
            if reason is not None:
                skipped += 1
                if skipped <= _MAX_WARNINGS:
                    warn(f"{path}:{lineno}: skipped malformed line ({reason})")
                continue
            step = int(rec["step"])
            records = by_kind.setdefault(rec["kind"], {})
            if records and step <= max(records):
                # a resume: drop this kind's records from the abandoned timeline
                for s in [s for s in records if s >= step]:
                    del records[s]
            records[step] = rec
    if skipped > _MAX_WARNINGS:
        warn(f"{path}: skipped {skipped} malformed lines in all")
    return {kind: [recs[s] for s in sorted(recs)] for kind, recs in by_kind.items()}


def series(records: Iterable[dict[str, Any]], x: str | Callable[[dict], Any], *y_path: str,
           ) -> tuple[list[float], list[float]]:
    """(xs, ys) over the records where both x (a key, or a function of the record) and the
    (nested) y value are finite numbers."""
    xs: list[float] = []
    ys: list[float] = []
    for rec in records:
        y: Any = rec
        for key in y_path:
            y = y.get(key) if isinstance(y, dict) else None
        xv, yv = number(x(rec) if callable(x) else rec.get(x)), number(y)
        if xv is not None and yv is not None:
            xs.append(xv)
            ys.append(yv)
    return xs, ys


def smooth(values: list[float], window: int | None = None) -> list[float]:
    """Centred moving average over `window` points (shrinking at the ends), so it does not lag.

    The default window is about 2% of the points, at most 201.
    """
    n = len(values)
    if window is None:
        window = max(1, min(201, n // 50))
    half = window // 2
    prefix = [0.0]
    for v in values:
        prefix.append(prefix[-1] + v)
    out = []
    for i in range(n):
        lo, hi = max(0, i - half), min(n, i + half + 1)
        out.append((prefix[hi] - prefix[lo]) / (hi - lo))
    return out


SMOOTH_MIN_POINTS = 8


def chart_window(n: int) -> int:
    """The smoothing window of a chart of n raw points: odd, at least 5 (so that a short run's
    smoothed line is not its raw line drawn again), about 2% of the points for long runs, at most 201."""
    w = max(5, min(201, n // 50))
    return w if w % 2 else w + 1


def smoothed(values: list[float]) -> list[float] | None:
    """The smoothed line a chart draws over its raw one; None for too few points to smooth."""
    return smooth(values, chart_window(len(values))) if len(values) >= SMOOTH_MIN_POINTS else None


# ----------------------------------------------------------------------------- the x axis

class XAxis:
    """One run's x values for the chosen axis: `tokens` (seen so far), `steps`, or `time`
    (wall-clock since the run began, including the gaps of a resume, in the unit `unit`).

    A record without its own tokens or time takes those of the train record of its step."""

    def __init__(self, metrics: dict[str, list[dict[str, Any]]], x: str = "tokens", unit: str | None = None):
        if x not in X_AXES:
            raise UserError(f"plot: x axis {x!r}: choose one of {', '.join(X_AXES)}")
        self.x = x
        train = metrics.get("train", [])
        self._by_step = {int(r["step"]): r for r in train}
        self._start = self._start_time(train)
        self.unit = unit or (self.time_unit(self.span(metrics)) if x == "time" else "")

    @staticmethod
    def _start_time(train: list[dict[str, Any]]) -> float | None:
        """When the run began: the first train record's time less that step's duration."""
        for rec in train:
            t, tokens, tok_s, step = (number(rec.get(k)) for k in ("time", "tokens", "tok_per_s", "step"))
            if t is None:
                continue
            dt = tokens / step / tok_s if tokens and step and tok_s else 0.0
            return t - dt
        return None

    def elapsed(self, rec: dict[str, Any]) -> float | None:
        """Seconds from the run's start to this record (its own time, or its step's train record's)."""
        t = number(rec.get("time"))
        if t is None:
            t = number(self._by_step.get(int(rec["step"]), {}).get("time"))
        return None if t is None or self._start is None else t - self._start

    def span(self, metrics: dict) -> float:
        times = [e for recs in metrics.values() for r in recs if (e := self.elapsed(r)) is not None]
        return max(times, default=0.0)

    @staticmethod
    def time_unit(seconds: float) -> str:
        return "h" if seconds >= 3 * 3600 else "min" if seconds >= 180 else "s"

    def __call__(self, rec: dict[str, Any]) -> float | None:
        if self.x == "steps":
            return number(rec.get("step"))
        if self.x == "tokens":
            tokens = number(rec.get("tokens"))
            return tokens if tokens is not None else number(self._by_step.get(int(rec["step"]), {}).get("tokens"))
        e = self.elapsed(rec)
        return None if e is None else e / {"s": 1, "min": 60, "h": 3600}[self.unit]

    @property
    def label(self) -> str:
        return {"tokens": "tokens", "steps": "step"}.get(self.x, f"wall-clock time ({self.unit})")


# ----------------------------------------------------------------------------- learning rates

def optimizer_of(config: dict | None) -> tuple[str, float | None, float | None]:
    """(optimizer, AdamW's peak lr, Muon's peak lr) from a run's config.json dict (adamw when unknown)."""
    train = (config or {}).get("train") or {}
    name = train.get("optimizer") if train.get("optimizer") in ("adamw", "muon") else "adamw"
    return name, number(train.get("lr")), number(train.get("muon_lr"))


def lr_series(train: list[dict[str, Any]], x: Callable, config: dict | None = None,
              ) -> list[tuple[str, tuple[list[float], list[float]]]]:
    """(label, (xs, lrs)) for each optimizer of a run. A Muon run has two: AdamW's (`lr`: the
    embeddings, the tied head, gains and biases) and Muon's (`muon_lr`: the blocks' matrices). Records of
    runs before `muon_lr` was logged get it from config.json: the same schedule factor, Muon's peak."""
    name, peak, muon_peak = optimizer_of(config)
    adamw = series(train, x, "lr")
    if name != "muon":
        return [("AdamW", adamw)] if adamw[1] else []
    muon = series(train, x, "muon_lr")
    if not muon[1] and peak and muon_peak:
        muon = series(train, x, "lr")
        muon = (muon[0], [v / peak * muon_peak for v in muon[1]])
    out = [("AdamW (embeddings, tied head, gains, biases)", adamw), ("Muon (the blocks' matrices)", muon)]
    return [(label, s) for label, s in out if s[1]]


def task_series(recs: list[dict[str, Any]], x: str | Callable = "step",
                ) -> list[tuple[str, str, tuple[list[float], list[float]]]]:
    """(task, metric, (xs, values)) of "tasks" records, in first-seen order: numbers only,
    stderrs left out."""
    keys: list[tuple[str, str]] = []
    for rec in recs:
        for task, row in (rec.get("tasks") or {}).items():
            if isinstance(row, dict):
                keys += [(task, m) for m in row if "stderr" not in m and (task, m) not in keys]
    panels = [(t, m, series(recs, x, "tasks", t, m)) for t, m in keys]
    return [p for p in panels if p[2][1]]


def run_labels(run_dirs: list[str | Path]) -> list[str]:
    """Legend labels: each run's directory name, or the path as given where names repeat."""
    names = [Path(r).resolve().name for r in run_dirs]
    if len(set(names)) == len(names):
        return names
    return [str(r) for r in run_dirs]
