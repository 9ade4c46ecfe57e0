"""PNG charts from a run's metrics: loss, learning rate, HellaSwag and throughput.

`plot_run(RUN)` reads RUN/metrics.jsonl (and RUN/config.json for the model's size, to pick
reference lines) and writes RUN/plots/*.png. `gptlab plot RUN` and the end of training call it.
`plot_runs([RUN1, RUN2, ...], OUT)` overlays several runs (`gptlab plot RUN1 RUN2 --out OUT`).

This module does not import torch, and imports matplotlib only when drawing (Agg, no screen).
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Iterable

from gptlab.atomic import replaced_file
from gptlab.config import HELLASWAG_REFERENCES, VAL_LOSS_REFERENCES, preset_for_shape
from gptlab.errors import UserError
from gptlab.rundir import RunDir

# Published numbers, keyed by the gpt2* preset of the same depth and width. Only the 124M
# numbers are recorded here; other sizes get no reference lines rather than guessed ones.
REFERENCES: dict[str, dict[str, float]] = {
    "gpt2": {
        "val_loss": VAL_LOSS_REFERENCES["gpt2"],  # OpenAI GPT-2 124M on FineWeb-Edu's first 100M val tokens
        "hellaswag_completion": HELLASWAG_REFERENCES["gpt2"]["completion"][1],  # completion-style acc_norm
        "hellaswag_harness": HELLASWAG_REFERENCES["gpt2"]["harness"][1],  # lm-eval-harness acc_norm
        "gpt3_hellaswag": HELLASWAG_REFERENCES["gpt2"]["gpt3"][1],  # GPT-3 Small, from the GPT-3 paper
    },
}
LABELS = {"gpt2": "124M"}

CHARTS = ("loss.png", "lr.png", "hellaswag.png", "tasks.png", "throughput.png")
_MAX_WARNINGS = 10


def _warn(msg: str) -> None:
    print(f"gptlab plot: warning: {msg}", file=sys.stderr)


def _number(value: Any) -> float | None:
    """A finite float, or None for null, missing, non-numeric, NaN or infinite values."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


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
            reason = None
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                reason = f"not valid JSON: {e.msg}"
            else:
                if not isinstance(rec, dict):
                    reason = "not a JSON object"
                elif not isinstance(rec.get("kind"), str):
                    reason = "no \"kind\""
                elif isinstance(rec.get("step"), bool) or not isinstance(rec.get("step"), (int, float)) \
                        or not math.isfinite(rec["step"]):
                    reason = "no numeric \"step\""
            if reason is not None:
                skipped += 1
                if skipped <= _MAX_WARNINGS:
                    _warn(f"{path}:{lineno}: skipped malformed line ({reason})")
                continue
            step = int(rec["step"])
            records = by_kind.setdefault(rec["kind"], {})
            if records and step <= max(records):
                # a resume: drop this kind's records from the abandoned timeline
                for s in [s for s in records if s >= step]:
                    del records[s]
            records[step] = rec
    if skipped > _MAX_WARNINGS:
        _warn(f"{path}: skipped {skipped} malformed lines in all")
    return {kind: [recs[s] for s in sorted(recs)] for kind, recs in by_kind.items()}


def _model_preset(run_dir: Path) -> str | None:
    """The gpt2* preset whose shape matches RUN/config.json's model, or None (also when unreadable)."""
    path = RunDir(run_dir).config_path
    if not path.is_file():
        return None
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
        model = config["model"]
        shape = SimpleNamespace(n_layer=int(model["n_layer"]), n_embd=int(model["n_embd"]))
    except (OSError, ValueError, KeyError, TypeError) as e:
        _warn(f"{path}: cannot read the model's shape ({e}); no reference lines")
        return None
    return preset_for_shape(shape)


def _series(records: Iterable[dict[str, Any]], x_key: str, *y_path: str) -> tuple[list[float], list[float]]:
    """(xs, ys) over the records where both x and the (nested) y value are finite numbers."""
    xs: list[float] = []
    ys: list[float] = []
    for rec in records:
        y: Any = rec
        for key in y_path:
            y = y.get(key) if isinstance(y, dict) else None
        x, y = _number(rec.get(x_key)), _number(y)
        if x is not None and y is not None:
            xs.append(x)
            ys.append(y)
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


def _save(fig: Any, path: Path) -> Path:
    """Write the figure as PNG whole or not at all (atomic.replaced_file)."""
    try:
        with replaced_file(path, "wb") as f:
            fig.savefig(f, format="png", dpi=120)
    except OSError as e:
        raise UserError(f"{path}: cannot write: {e}") from None
    return path


def _lone(values: list) -> str | None:
    """A marker for a one-point series, which a line alone would not show."""
    return "o" if len(values) == 1 else None


def _figure() -> tuple[Any, Any]:
    # Figure without pyplot: no global state, no GUI backend, safe to call from training.
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 5), layout="constrained")
    ax = fig.add_subplot()
    ax.grid(True, alpha=0.3)
    return fig, ax


def _plot_loss(metrics: dict, refs: dict, size: str | None, title: str, path: Path) -> Path | None:
    from matplotlib.ticker import EngFormatter

    train = metrics.get("train", [])
    val = metrics.get("val", [])
    tx, ty = _series(train, "tokens", "loss")
    vx, vy = _series(val, "tokens", "loss")
    if not ty and not vy:
        return None
    fig, ax = _figure()
    if ty:
        ax.plot(tx, ty, lw=0.6, alpha=0.35, color="C0", marker=_lone(ty), label="train loss")
        if len(ty) > 1:
            ax.plot(tx, smooth(ty), lw=1.6, color="C0", label="train loss (smoothed)")
    if vy:
        ax.plot(vx, vy, lw=1.6, color="C1", marker="o" if len(vy) <= 50 else None, ms=3, label="val loss")
    if "val_loss" in refs:
        ax.axhline(refs["val_loss"], ls="--", color="C3", lw=1.2,
                   label=f"OpenAI GPT-2 {LABELS[size]} val ({refs['val_loss']})")
    # The first steps fall from ~10.9; cap the axis at twice the final loss so the end of
    # training, where runs differ, is not squeezed into a sliver of the chart.
    final = min(([smooth(ty)[-1]] if ty else []) + ([vy[-1]] if vy else []))
    if final > 0 and max(ty + vy) > 2 * final:
        ax.set_ylim(top=max(2 * final, 1.1 * refs.get("val_loss", 0.0)))
    ax.set_xlabel("tokens")
    ax.xaxis.set_major_formatter(EngFormatter())
    ax.set_ylabel("loss")
    ax.set_title(f"loss — {title}")
    ax.legend()
    return _save(fig, path)


def _plot_lr(metrics: dict, title: str, path: Path) -> Path | None:
    xs, ys = _series(metrics.get("train", []), "step", "lr")
    if not ys:
        return None
    fig, ax = _figure()
    ax.plot(xs, ys, lw=1.6, color="C2", marker=_lone(ys))
    ax.set_xlabel("step")
    ax.set_ylabel("learning rate")
    ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    ax.set_title(f"learning rate — {title}")
    return _save(fig, path)


def _plot_hellaswag(metrics: dict, refs: dict, size: str | None, title: str, path: Path) -> Path | None:
    recs = metrics.get("hellaswag", [])
    cx, cy = _series(recs, "step", "completion", "acc_norm")
    hx, hy = _series(recs, "step", "harness", "acc_norm")
    if not cy and not hy:
        return None
    fig, ax = _figure()
    marker = "o" if max(len(cy), len(hy)) <= 50 else None
    if cy:
        ax.plot(cx, cy, lw=1.6, color="C0", marker=marker, ms=3, label="completion acc_norm")
    if hy:
        ax.plot(hx, hy, lw=1.6, color="C1", marker=marker, ms=3, label="harness acc_norm")
    if "hellaswag_completion" in refs:
        ax.axhline(refs["hellaswag_completion"], ls="--", color="C0", lw=1.0,
                   label=f"OpenAI GPT-2 {LABELS[size]} completion ({refs['hellaswag_completion']})")
    if "hellaswag_harness" in refs:
        ax.axhline(refs["hellaswag_harness"], ls="--", color="C1", lw=1.0,
                   label=f"OpenAI GPT-2 {LABELS[size]} harness ({refs['hellaswag_harness']})")
    if "gpt3_hellaswag" in refs:
        ax.axhline(refs["gpt3_hellaswag"], ls=":", color="C3", lw=1.2,
                   label=f"GPT-3 {LABELS[size]} ({refs['gpt3_hellaswag']})")
    ax.axhline(0.25, ls=":", color="grey", lw=0.8, label="chance (0.25)")
    ax.set_xlabel("step")
    ax.set_ylabel("HellaSwag acc_norm")
    ax.set_title(f"HellaSwag — {title}")
    ax.legend()
    return _save(fig, path)


def task_series(recs: list[dict[str, Any]]) -> list[tuple[str, str, tuple[list[float], list[float]]]]:
    """(task, metric, (steps, values)) of "tasks" records, in first-seen order: numbers only,
    stderrs left out."""
    keys: list[tuple[str, str]] = []
    for rec in recs:
        for task, row in (rec.get("tasks") or {}).items():
            if isinstance(row, dict):
                keys += [(task, m) for m in row if "stderr" not in m and (task, m) not in keys]
    panels = [(t, m, _series(recs, "step", "tasks", t, m)) for t, m in keys]
    return [p for p in panels if p[2][1]]


def _plot_tasks(metrics: dict, title: str, path: Path) -> Path | None:
    """--eval-tasks records: one panel per harness task and metric (stderrs left out), two columns,
    since accuracies and perplexities do not share a scale."""
    from matplotlib.figure import Figure

    panels = task_series(metrics.get("tasks", []))
    if not panels:
        return None
    cols = 1 if len(panels) == 1 else 2
    rows = -(-len(panels) // cols)
    fig = Figure(figsize=(5 * cols, 1 + 2.6 * rows), layout="constrained")
    fig.suptitle(f"harness tasks — {title}")
    for i, (task, metric, (xs, ys)) in enumerate(panels, 1):
        ax = fig.add_subplot(rows, cols, i)
        ax.grid(True, alpha=0.3)
        ax.plot(xs, ys, lw=1.6, color=f"C{(i - 1) % 10}", marker="o" if len(ys) <= 50 else None, ms=3)
        ax.set_title(f"{task}: {metric}", fontsize=10)
        ax.set_xlabel("step")
    return _save(fig, path)


def _plot_throughput(metrics: dict, title: str, path: Path) -> Path | None:
    from matplotlib.ticker import EngFormatter, PercentFormatter

    train = metrics.get("train", [])
    xs, ys = _series(train, "step", "tok_per_s")
    mx, my = _series(train, "step", "mfu")
    if not ys and not my:
        return None
    fig, ax = _figure()
    lines = []
    if ys:
        lines += ax.plot(xs, ys, lw=1.2, color="C0", marker=_lone(ys), label="tokens/s")
        ax.set_ylabel("tokens/s")
        ax.yaxis.set_major_formatter(EngFormatter())
        ax.set_ylim(bottom=0)
    if my:
        ax2 = ax.twinx() if ys else ax
        # MFU as a fraction (0.45) or already in percent (45): show percent either way
        ax2.yaxis.set_major_formatter(PercentFormatter(xmax=1.0 if max(my) <= 1.0 else 100.0))
        lines += ax2.plot(mx, my, lw=1.2, color="C1", marker=_lone(my), label="MFU")
        ax2.set_ylabel("MFU")
        ax2.set_ylim(bottom=0)
    ax.set_xlabel("step")
    ax.set_title(f"throughput — {title}")
    ax.legend(lines, [ln.get_label() for ln in lines], loc="lower right")
    return _save(fig, path)


def plot_run(run_dir: str | Path, out_dir: str | Path | None = None) -> list[Path]:
    """Draw RUN/metrics.jsonl as PNGs in out_dir (default RUN/plots); return the files written.

    Charts whose data is absent are skipped. Raises UserError when RUN or its metrics are
    missing, or hold no records.
    """
    run_dir = Path(run_dir)
    metrics = _run_metrics(run_dir)
    metrics_path = RunDir(run_dir).metrics_path
    size = _model_preset(run_dir)
    refs = REFERENCES.get(size, {}) if size else {}
    title = run_dir.resolve().name + (f" ({size})" if size else "")
    out = _make_out(Path(out_dir) if out_dir is not None else RunDir(run_dir).plots_dir)

    # Figures are drawn without pyplot (see _figure), so no backend is chosen or changed:
    # no screen is needed and a notebook's own backend is left alone.
    written = [
        _plot_loss(metrics, refs, size, title, out / "loss.png"),
        _plot_lr(metrics, title, out / "lr.png"),
        _plot_hellaswag(metrics, refs, size, title, out / "hellaswag.png"),
        _plot_tasks(metrics, title, out / "tasks.png"),
        _plot_throughput(metrics, title, out / "throughput.png"),
        _plot_bpb_overlay([(title, metrics)], out / "bpb.png"),
    ]
    files = [p for p in written if p is not None]
    if not files:
        kinds = ", ".join(sorted(metrics))
        raise UserError(f"{metrics_path}: nothing to plot (no train, val or hellaswag values; kinds: {kinds})")
    return files


def _run_metrics(run_dir: Path) -> dict[str, list[dict[str, Any]]]:
    """RUN/metrics.jsonl grouped by kind; UserError when RUN or its metrics are missing or empty."""
    if not run_dir.exists():
        raise UserError(f"{run_dir}: no such run directory")
    if not run_dir.is_dir():
        raise UserError(f"{run_dir}: not a directory (expected a run directory)")
    metrics_path = RunDir(run_dir).metrics_path
    if not metrics_path.is_file():
        raise UserError(f"{run_dir}: no metrics.jsonl (is this a run directory?)")
    metrics = read_metrics(metrics_path)
    if not metrics:
        raise UserError(f"{metrics_path}: no metric records")
    return metrics


def _make_out(out: Path) -> Path:
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"{out}: cannot create the output directory: {e}") from None
    return out


# ----------------------------------------------------------------------------- several runs, one chart

def run_labels(run_dirs: list[str | Path]) -> list[str]:
    """Legend labels: each run's directory name, or the path as given where names repeat."""
    names = [Path(r).resolve().name for r in run_dirs]
    if len(set(names)) == len(names):
        return names
    return [str(r) for r in run_dirs]


def _plot_loss_overlay(runs: list[tuple[str, dict]], path: Path) -> Path | None:
    """Val loss (solid, with markers) and smoothed train loss (thin) per run, one colour each."""
    from matplotlib.ticker import EngFormatter

    fig, ax = _figure()
    finals, peaks, drawn = [], [], False
    for i, (label, metrics) in enumerate(runs):
        tx, ty = _series(metrics.get("train", []), "tokens", "loss")
        vx, vy = _series(metrics.get("val", []), "tokens", "loss")
        color = f"C{i % 10}"
        if len(ty) > 1:
            ty = smooth(ty)
        if ty:
            ax.plot(tx, ty, lw=0.9, alpha=0.45, color=color, marker=_lone(ty),
                    label=f"{label} train (smoothed)")
        if vy:
            ax.plot(vx, vy, lw=1.8, color=color, marker="o" if len(vy) <= 50 else None, ms=3,
                    label=f"{label} val")
        if ty or vy:
            drawn = True
            finals.append(min(([ty[-1]] if ty else []) + ([vy[-1]] if vy else [])))
            peaks.append(max(ty + vy))
    if not drawn:
        return None
    # cap the axis at twice the lowest final loss, so where runs differ is not a sliver of the chart
    low = min(finals)
    if low > 0 and max(peaks) > 2 * low:
        ax.set_ylim(top=2 * low)
    ax.set_xlabel("tokens")
    ax.xaxis.set_major_formatter(EngFormatter())
    ax.set_ylabel("loss")
    ax.set_title("loss — " + " vs ".join(label for label, _ in runs))
    ax.legend(fontsize="small")
    return _save(fig, path)


def _plot_bpb_overlay(runs: list[tuple[str, dict]], path: Path) -> Path | None:
    """Val bits per byte per run against the step: the loss that compares runs whatever their
    tokenizers (loss per token does not). Drawn only when some run logged it."""
    fig, ax = _figure()
    drawn = False
    for i, (label, metrics) in enumerate(runs):
        xs, ys = _series(metrics.get("val", []), "step", "bits_per_byte")
        if ys:
            ax.plot(xs, ys, lw=1.8, color=f"C{i % 10}", marker="o" if len(ys) <= 50 else None, ms=3,
                    label=f"{label} val")
            drawn = True
    if not drawn:
        return None
    ax.set_xlabel("step")
    ax.set_ylabel("bits per byte")
    ax.set_title("val bits per byte — " + " vs ".join(label for label, _ in runs))
    ax.legend(fontsize="small")
    return _save(fig, path)


def _plot_lr_overlay(runs: list[tuple[str, dict]], path: Path) -> Path | None:
    fig, ax = _figure()
    drawn = False
    for i, (label, metrics) in enumerate(runs):
        xs, ys = _series(metrics.get("train", []), "tokens", "lr")
        if ys:
            ax.plot(xs, ys, lw=1.6, color=f"C{i % 10}", marker=_lone(ys), label=label)
            drawn = True
    if not drawn:
        return None
    ax.set_xlabel("tokens")
    ax.set_ylabel("learning rate")
    ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    ax.set_title("learning rate")
    ax.legend(fontsize="small")
    return _save(fig, path)


def plot_runs(run_dirs: list[str | Path], out_dir: str | Path, labels: list[str] | None = None) -> list[Path]:
    """Several runs in one chart each: out_dir/loss.png (val and smoothed train loss against
    tokens) and out_dir/lr.png, with a legend naming each run. Returns the files written."""
    if not run_dirs:
        raise UserError("plot: name at least one run directory")
    labels = labels or run_labels(run_dirs)
    runs = [(label, _run_metrics(Path(r))) for label, r in zip(labels, run_dirs)]
    out = _make_out(Path(out_dir))
    written = [_plot_loss_overlay(runs, out / "loss.png"), _plot_lr_overlay(runs, out / "lr.png"),
               _plot_bpb_overlay(runs, out / "bpb.png")]
    files = [p for p in written if p is not None]
    if not files:
        raise UserError("nothing to plot: no run has train or val loss values")
    return files
