"""PNG charts from a run's metrics: loss, learning rate, HellaSwag and throughput.

`plot_run(RUN)` reads RUN/metrics.jsonl (and RUN/config.json for the model's size, to pick
reference lines, and for the optimizer) and writes RUN/plots/*.png. `gptlab plot RUN` and the end
of training call it. `plot_runs([RUN1, RUN2, ...], OUT)` overlays several runs (`gptlab plot RUN1
RUN2 --out OUT`). Both take `x`: "tokens" (the default), "steps" or "time" (wall-clock), for every chart.

What is drawn (series, smoothing, the x axis, each optimizer's learning rate) comes from plotdata.py.
This module does not import torch, and imports matplotlib only when drawing (Agg, no screen).
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from gptlab.atomic import replaced_file
from gptlab.config import HELLASWAG_REFERENCES, VAL_LOSS_REFERENCES, preset_for_shape
from gptlab.errors import UserError
from gptlab.plotdata import (X_AXES, XAxis, chart_window, lr_series, read_metrics, run_labels, series, smooth,
                             smoothed, task_series, warn)
from gptlab.rundir import RunDir

__all__ = ["plot_run", "plot_runs", "read_metrics", "smooth", "task_series", "run_labels", "X_AXES", "CHARTS"]

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
MARKERS_UP_TO = 200
"""Raw series of at most this many points are drawn with a marker on each point."""


def _read_config(run_dir: Path) -> dict | None:
    """RUN/config.json as a dict, or None when absent or unreadable (with a warning)."""
    path = RunDir(run_dir).config_path
    if not path.is_file():
        return None
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, ValueError) as e:
        warn(f"{path}: cannot read ({e}); no reference lines")
        return None
    return config if isinstance(config, dict) else None


def _model_preset(run_dir: Path, config: dict | None) -> str | None:
    """The gpt2* preset whose shape matches the config's model, or None (also when unreadable)."""
    if config is None:
        return None
    try:
        model = config["model"]
        shape = SimpleNamespace(n_layer=int(model["n_layer"]), n_embd=int(model["n_embd"]))
    except (ValueError, KeyError, TypeError) as e:
        warn(f"{RunDir(run_dir).config_path}: cannot read the model's shape ({e}); no reference lines")
        return None
    return preset_for_shape(shape)


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


def _marker(values: list, up_to: int = 50) -> str | None:
    return "o" if len(values) <= up_to else None


def _figure() -> tuple[Any, Any]:
    # Figure without pyplot: no global state, no GUI backend, safe to call from training.
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 5), layout="constrained")
    ax = fig.add_subplot()
    ax.grid(True, alpha=0.3)
    return fig, ax


def _x_axis(ax: Any, xa: XAxis) -> None:
    from matplotlib.ticker import EngFormatter

    ax.set_xlabel(xa.label)
    if xa.x == "tokens" and ax.get_xscale() == "linear":
        ax.xaxis.set_major_formatter(EngFormatter())


def _train_lines(ax: Any, tx: list, ty: list, color: str = "C0", label: str = "train loss") -> list | None:
    """The raw train loss (thin, a dot on each point of a short run) and, over it, its smoothed line
    (thick): both show in a run of a few dozen steps. Returns the smoothed values (or None)."""
    small = len(ty) <= MARKERS_UP_TO
    ax.plot(tx, ty, lw=0.8, alpha=0.45, color=color, marker="o" if small or len(ty) == 1 else None,
            ms=2.5 if small else 4, label=label)
    sm = smoothed(ty)
    if sm is not None:
        ax.plot(tx, sm, lw=2.0, color=color, label=f"{label} (smoothed over {chart_window(len(ty))} steps)")
    return sm


def _loss_inset(ax: Any, xa: XAxis, curves: list[tuple[str, list, list, list, list]]) -> None:
    """Every point, on a log x axis: the early steps, above the main chart's y limit, are here.
    curves: (colour, train xs, train ys, val xs, val ys) per run; train thin, val with markers."""
    ins = ax.inset_axes([0.56, 0.5, 0.42, 0.46])
    ins.grid(True, alpha=0.3)
    for color, tx, ty, vx, vy in curves:
        t = [(x, y) for x, y in zip(tx, ty) if x > 0]  # (a log axis has no 0)
        v = [(x, y) for x, y in zip(vx, vy) if x > 0]
        if t:
            ins.plot(*zip(*t), lw=0.6, alpha=0.6, color=color)
        if v:
            ins.plot(*zip(*v), lw=1.2, color=color, marker=_marker(vy), ms=2, ls="--" if t else "-")
    ins.set_xscale("log")
    ins.tick_params(labelsize=7)
    ins.set_title(f"every point ({xa.label}, log scale)", fontsize=8)


def _plot_loss(metrics: dict, refs: dict, size: str | None, title: str, path: Path, xa: XAxis) -> Path | None:
    tx, ty = series(metrics.get("train", []), xa, "loss")
    vx, vy = series(metrics.get("val", []), xa, "loss")
    if not ty and not vy:
        return None
    fig, ax = _figure()
    sm = _train_lines(ax, tx, ty) if ty else None
    if vy:
        ax.plot(vx, vy, lw=1.6, color="C1", marker=_marker(vy), ms=3, label="val loss")
    if "val_loss" in refs:
        ax.axhline(refs["val_loss"], ls="--", color="C3", lw=1.2,
                   label=f"OpenAI GPT-2 {LABELS[size]} val ({refs['val_loss']})")
    # The first steps fall from ~10.9; where they are above twice the final loss, the axis stops
    # there, so that the end of training, where runs differ, is not squeezed into a sliver of the
    # chart, and an inset shows every point against a log axis.
    final = min(([(sm or ty)[-1]] if ty else []) + ([vy[-1]] if vy else []))
    top = max(2 * final, 1.1 * refs.get("val_loss", 0.0))
    clipped = final > 0 and max(ty + vy) > top
    if clipped:
        ax.set_ylim(top=top)
        _loss_inset(ax, xa, [("C0", tx, ty, [], []), ("C1", [], [], vx, vy)])
    _x_axis(ax, xa)
    ax.set_ylabel("loss")
    ax.set_title(f"loss — {title}")
    ax.legend(loc="lower left" if clipped else "best", fontsize="small")
    return _save(fig, path)


def _plot_lr(metrics: dict, config: dict | None, title: str, path: Path, xa: XAxis) -> Path | None:
    """Each optimizer's learning rate, labelled (a Muon run has two)."""
    lrs = lr_series(metrics.get("train", []), xa, config)
    if not lrs:
        return None
    fig, ax = _figure()
    for i, (label, (xs, ys)) in enumerate(lrs):
        ax.plot(xs, ys, lw=1.6, color=("C2", "C4")[i % 2], marker=_lone(ys), label=f"{label}, peak {max(ys):.3g}")
    _x_axis(ax, xa)
    ax.set_ylabel("learning rate")
    ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    ax.set_title(f"learning rate — {title}")
    ax.legend(fontsize="small")
    return _save(fig, path)


def _plot_hellaswag(metrics: dict, refs: dict, size: str | None, title: str, path: Path, xa: XAxis) -> Path | None:
    recs = metrics.get("hellaswag", [])
    cx, cy = series(recs, xa, "completion", "acc_norm")
    hx, hy = series(recs, xa, "harness", "acc_norm")
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
    _x_axis(ax, xa)
    ax.set_ylabel("HellaSwag acc_norm")
    ax.set_title(f"HellaSwag — {title}")
    ax.legend()
    return _save(fig, path)


def _plot_tasks(metrics: dict, title: str, path: Path, xa: XAxis) -> Path | None:
    """--eval-tasks records: one panel per harness task and metric (stderrs left out), two columns,
    since accuracies and perplexities do not share a scale."""
    from matplotlib.figure import Figure

    panels = task_series(metrics.get("tasks", []), xa)
    if not panels:
        return None
    cols = 1 if len(panels) == 1 else 2
    rows = -(-len(panels) // cols)
    fig = Figure(figsize=(5 * cols, 1 + 2.6 * rows), layout="constrained")
    fig.suptitle(f"harness tasks — {title}")
    for i, (task, metric, (xs, ys)) in enumerate(panels, 1):
        ax = fig.add_subplot(rows, cols, i)
        ax.grid(True, alpha=0.3)
        ax.plot(xs, ys, lw=1.6, color=f"C{(i - 1) % 10}", marker=_marker(ys), ms=3)
        ax.set_title(f"{task}: {metric}", fontsize=10)
        _x_axis(ax, xa)
    return _save(fig, path)


def _plot_throughput(metrics: dict, title: str, path: Path, xa: XAxis) -> Path | None:
    from matplotlib.ticker import EngFormatter, PercentFormatter

    train = metrics.get("train", [])
    xs, ys = series(train, xa, "tok_per_s")
    mx, my = series(train, xa, "mfu")
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
    _x_axis(ax, xa)
    ax.set_title(f"throughput — {title}")
    ax.legend(lines, [ln.get_label() for ln in lines], loc="lower right")
    return _save(fig, path)


def _check_x(x: str) -> None:
    if x not in X_AXES:
        raise UserError(f"plot: x axis {x!r}: choose one of {', '.join(X_AXES)}")


def plot_run(run_dir: str | Path, out_dir: str | Path | None = None, x: str = "tokens") -> list[Path]:
    """Draw RUN/metrics.jsonl as PNGs in out_dir (default RUN/plots); return the files written.

    `x` is every chart's x axis: "tokens" seen, optimizer "steps", or wall-clock "time" since the
    run began. Charts whose data is absent are skipped. Raises UserError when RUN or its metrics
    are missing, or hold no records.
    """
    _check_x(x)
    run_dir = Path(run_dir)
    metrics = _run_metrics(run_dir)
    metrics_path = RunDir(run_dir).metrics_path
    config = _read_config(run_dir)
    size = _model_preset(run_dir, config)
    refs = REFERENCES.get(size, {}) if size else {}
    title = run_dir.resolve().name + (f" ({size})" if size else "")
    out = _make_out(Path(out_dir) if out_dir is not None else RunDir(run_dir).plots_dir)
    xa = XAxis(metrics, x)

    # Figures are drawn without pyplot (see _figure), so no backend is chosen or changed:
    # no screen is needed and a notebook's own backend is left alone.
    written = [
        _plot_loss(metrics, refs, size, title, out / "loss.png", xa),
        _plot_lr(metrics, config, title, out / "lr.png", xa),
        _plot_hellaswag(metrics, refs, size, title, out / "hellaswag.png", xa),
        _plot_tasks(metrics, title, out / "tasks.png", xa),
        _plot_throughput(metrics, title, out / "throughput.png", xa),
        _plot_bpb_overlay([(title, metrics, xa)], out / "bpb.png"),
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

Run = tuple  # (label, metrics, XAxis[, config]): one run of an overlay


def _plot_loss_overlay(runs: list[Run], path: Path) -> Path | None:
    """Val loss (solid, with markers) and smoothed train loss (thin) per run, one colour each."""
    fig, ax = _figure()
    finals, peaks, drawn, raw = [], [], False, []
    for i, (label, metrics, xa, *_) in enumerate(runs):
        tx, ty = series(metrics.get("train", []), xa, "loss")
        vx, vy = series(metrics.get("val", []), xa, "loss")
        color = f"C{i % 10}"
        raw.append((color, tx, ty, vx, vy))
        ty = smoothed(ty) or ty
        if ty:
            ax.plot(tx, ty, lw=0.9, alpha=0.45, color=color, marker=_lone(ty),
                    label=f"{label} train (smoothed)")
        if vy:
            ax.plot(vx, vy, lw=1.8, color=color, marker=_marker(vy), ms=3, label=f"{label} val")
        if ty or vy:
            drawn = True
            finals.append(min(([ty[-1]] if ty else []) + ([vy[-1]] if vy else [])))
            peaks.append(max(ty + vy))
    if not drawn:
        return None
    # cap the axis at twice the lowest final loss, so where runs differ is not a sliver of the chart
    low = min(finals)
    clipped = low > 0 and max(peaks + [max(c[2] + c[4], default=0) for c in raw]) > 2 * low
    if clipped:  # and an inset shows every raw point
        ax.set_ylim(top=2 * low)
        _loss_inset(ax, runs[0][2], raw)
    _x_axis(ax, runs[0][2])
    ax.set_ylabel("loss")
    ax.set_title("loss — " + " vs ".join(r[0] for r in runs))
    ax.legend(loc="lower left" if clipped else "best", fontsize="small")
    return _save(fig, path)


def _plot_bpb_overlay(runs: list[Run], path: Path) -> Path | None:
    """Val bits per byte per run: the loss that compares runs whatever their tokenizers (loss per
    token does not). Drawn only when some run logged it."""
    fig, ax = _figure()
    drawn = False
    for i, (label, metrics, xa, *_) in enumerate(runs):
        xs, ys = series(metrics.get("val", []), xa, "bits_per_byte")
        if ys:
            ax.plot(xs, ys, lw=1.8, color=f"C{i % 10}", marker=_marker(ys), ms=3, label=f"{label} val")
            drawn = True
    if not drawn:
        return None
    _x_axis(ax, runs[0][2])
    ax.set_ylabel("bits per byte")
    ax.set_title("val bits per byte — " + " vs ".join(r[0] for r in runs))
    ax.legend(fontsize="small")
    return _save(fig, path)


def _plot_lr_overlay(runs: list[Run], path: Path) -> Path | None:
    """Each run's learning rates in its colour: AdamW's solid, Muon's dashed."""
    fig, ax = _figure()
    drawn = False
    for i, (label, metrics, xa, config) in enumerate(runs):
        for opt, (xs, ys) in lr_series(metrics.get("train", []), xa, config):
            ax.plot(xs, ys, lw=1.6, color=f"C{i % 10}", ls="--" if opt.startswith("Muon") else "-",
                    marker=_lone(ys), label=f"{label}: {opt.split(' ')[0]}")
            drawn = True
    if not drawn:
        return None
    _x_axis(ax, runs[0][2])
    ax.set_ylabel("learning rate")
    ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    ax.set_title("learning rate")
    ax.legend(fontsize="small")
    return _save(fig, path)


def plot_runs(run_dirs: list[str | Path], out_dir: str | Path, labels: list[str] | None = None,
              x: str = "tokens") -> list[Path]:
    """Several runs in one chart each: out_dir/loss.png (val and smoothed train loss) and
    out_dir/lr.png (each optimizer's rate), with a legend naming each run, against `x` ("tokens",
    "steps", or "time": wall-clock since each run began). Returns the files written."""
    _check_x(x)
    if not run_dirs:
        raise UserError("plot: name at least one run directory")
    labels = labels or run_labels(run_dirs)
    loaded = [(label, _run_metrics(Path(r)), _read_config(Path(r))) for label, r in zip(labels, run_dirs)]
    unit = None
    if x == "time":  # one unit for all runs: the longest run's
        unit = XAxis.time_unit(max(XAxis(m, x).span(m) for _, m, _ in loaded))
    runs = [(label, m, XAxis(m, x, unit), c) for label, m, c in loaded]
    out = _make_out(Path(out_dir))
    written = [_plot_loss_overlay(runs, out / "loss.png"), _plot_lr_overlay(runs, out / "lr.png"),
               _plot_bpb_overlay(runs, out / "bpb.png")]
    files = [p for p in written if p is not None]
    if not files:
        raise UserError("nothing to plot: no run has train or val loss values")
    return files
