"""plot.py: charts from a synthetic metrics.jsonl, resumes, malformed lines, errors, no torch."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from gptlab.atomic import is_temporary
from gptlab.errors import UserError
from gptlab import plot as plot_mod
from gptlab.plot import plot_run, plot_runs, read_metrics, run_labels, smooth

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
ALL_CHARTS = ["loss.png", "lr.png", "hellaswag.png", "throughput.png"]


def train_rec(step: int, mfu: float | None = 0.4) -> dict:
    return {"step": step, "kind": "train", "loss": 11.0 * math.exp(-step / 20) + 3.0,
            "lr": 6e-4 * min(1.0, (step + 1) / 10), "grad_norm": 1.0, "tokens": (step + 1) * 4096,
            "tok_per_s": 50_000.0 + step, "mfu": mfu, "time": 0.08}


def val_rec(step: int) -> dict:
    return {"step": step, "kind": "val", "loss": 10.0 * math.exp(-step / 20) + 3.2, "tokens": (step + 1) * 4096}


def hs_rec(step: int) -> dict:
    return {"step": step, "kind": "hellaswag", "tokens": (step + 1) * 4096,
            "completion": {"acc": 0.25, "acc_norm": 0.25 + step / 1000, "n": 100},
            "harness": {"acc": 0.26, "acc_norm": 0.26 + step / 1000, "n": 100}}


def write_run(run: Path, records: list, model: dict | None = None, tail: str = "") -> Path:
    run.mkdir(parents=True, exist_ok=True)
    lines = [r if isinstance(r, str) else json.dumps(r) for r in records]
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n" + tail, encoding="utf-8")
    if model is not None:
        (run / "config.json").write_text(json.dumps({"model": model, "train": {}}), encoding="utf-8")
    return run


def full_records(steps: int = 40) -> list:
    recs: list = []
    for s in range(steps):
        recs.append(train_rec(s))
        if s % 10 == 0 or s == steps - 1:
            recs.append(val_rec(s))
        if s % 20 == 0 or s == steps - 1:
            recs.append(hs_rec(s))
    return recs


def assert_pngs(files: list, out: Path, names: list) -> None:
    assert [Path(f) for f in files] == [out / n for n in names]
    for n in names:
        data = (out / n).read_bytes()
        assert data[:8] == PNG_MAGIC, n
        assert len(data) > 1000, n
    assert not [p for p in out.iterdir() if is_temporary(p.name)], "temporary files left behind"


def test_all_charts_written(tmp_path):
    gpt2 = {"n_layer": 12, "n_head": 12, "n_embd": 768, "seq_len": 1024}
    run = write_run(tmp_path / "run", full_records(), model=gpt2)
    files = plot_run(run)
    assert_pngs(files, run / "plots", ALL_CHARTS)


def test_harness_task_records_get_their_own_chart(tmp_path):
    """A panel per task and metric, stderrs and non-numbers left out."""
    tasks = [{"step": s, "kind": "tasks", "tokens": s, "tasks": {"mc": {"acc": 0.3 + s / 100, "acc_stderr": 0.1},
                                                                 "ppl": {"word_perplexity": 900.0 - s, "alias": "x"}}}
             for s in (0, 5, 9)]
    files = plot_run(write_run(tmp_path / "run", full_records(10) + tasks))
    assert_pngs(files, tmp_path / "run" / "plots", ["loss.png", "lr.png", "hellaswag.png", "tasks.png", "throughput.png"])
    assert plot_mod.task_series(tasks) == [("mc", "acc", ([0.0, 5.0, 9.0], [0.3, 0.35, 0.39])),
                                           ("ppl", "word_perplexity", ([0.0, 5.0, 9.0], [900.0, 895.0, 891.0]))]


def test_out_dir_and_unknown_model_size(tmp_path):
    tiny = {"n_layer": 4, "n_head": 4, "n_embd": 128, "seq_len": 128}
    run = write_run(tmp_path / "run", full_records(), model=tiny)
    out = tmp_path / "elsewhere" / "charts"
    files = plot_run(run, out)
    assert_pngs(files, out, ALL_CHARTS)
    assert not (run / "plots").exists()


def test_absent_data_skips_charts(tmp_path):
    # train records only, MFU unknown, no config.json: no hellaswag chart, the rest drawn
    run = write_run(tmp_path / "run", [train_rec(s, mfu=None) for s in range(5)])
    assert_pngs(plot_run(run), run / "plots", ["loss.png", "lr.png", "throughput.png"])
    # val records only: just the loss chart
    run2 = write_run(tmp_path / "run2", [val_rec(0), val_rec(10)])
    assert_pngs(plot_run(run2), run2 / "plots", ["loss.png"])


def test_resumed_run_keeps_last_record_per_step(tmp_path):
    first = [train_rec(s) for s in range(10)] + [val_rec(9)]
    # resumed from the step-5 checkpoint: steps 5.. repeat with new values
    again = [dict(train_rec(s), loss=1.0) for s in range(5, 8)] + [dict(val_rec(7), loss=2.0)]
    run = write_run(tmp_path / "run", first + again)
    metrics = read_metrics(run / "metrics.jsonl")
    train = metrics["train"]
    assert [r["step"] for r in train] == list(range(8))  # the abandoned steps 8, 9 are gone
    assert [r["loss"] for r in train[5:]] == [1.0, 1.0, 1.0]
    assert [(r["step"], r["loss"]) for r in metrics["val"]] == [(7, 2.0)]
    assert_pngs(plot_run(run), run / "plots", ["loss.png", "lr.png", "throughput.png"])


def test_same_step_logged_twice_keeps_last(tmp_path):
    run = write_run(tmp_path / "run", [val_rec(0), dict(val_rec(0), loss=5.0)])
    assert [r["loss"] for r in read_metrics(run / "metrics.jsonl")["val"]] == [5.0]


def test_malformed_lines_skipped_with_warning(tmp_path, capsys):
    recs = [train_rec(0), "", "not json", train_rec(1), "[1, 2]", {"kind": "train"}, train_rec(2)]
    run = write_run(tmp_path / "run", recs, tail='{"step": 3, "kind": "tra')  # killed mid-write
    files = plot_run(run)
    assert_pngs(files, run / "plots", ["loss.png", "lr.png", "throughput.png"])
    err = capsys.readouterr().err
    for lineno in (3, 5, 6, 8):
        assert f"metrics.jsonl:{lineno}:" in err
    assert "metrics.jsonl:2:" not in err  # a blank line is no error
    assert len(err.strip().splitlines()) == 4
    assert [r["step"] for r in read_metrics(run / "metrics.jsonl")["train"]] == [0, 1, 2]


def test_null_and_nonfinite_values_are_gaps(tmp_path):
    recs = [train_rec(0), dict(train_rec(1), loss=None, lr=float("nan")), dict(train_rec(2), loss=float("inf"))]
    run = write_run(tmp_path / "run", recs)
    assert_pngs(plot_run(run), run / "plots", ["loss.png", "lr.png", "throughput.png"])


def test_smooth():
    assert smooth([]) == []
    assert smooth([2.0, 2.0, 2.0]) == [2.0, 2.0, 2.0]
    assert smooth([0.0, 3.0, 0.0, 3.0], window=3) == [1.5, 1.0, 2.0, 1.5]  # centred, shrinks at the ends
    ramp = [float(i) for i in range(100)]
    assert smooth(ramp, window=11)[5:95] == ramp[5:95]  # centred: no lag on a trend


def test_library_errors(tmp_path):
    with pytest.raises(UserError, match="no such run directory"):
        plot_run(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no metrics.jsonl"):
        plot_run(tmp_path / "empty")
    write_run(tmp_path / "blank", [], tail="\n\n")
    with pytest.raises(UserError, match="no metric records"):
        plot_run(tmp_path / "blank")


def test_cli_prints_files(cli, tmp_path):
    run = write_run(tmp_path / "run", full_records(12))
    out = tmp_path / "out"
    r = cli("plot", str(run), "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert [Path(line) for line in r.stdout.splitlines()] == [out / n for n in ALL_CHARTS]
    assert_pngs(r.stdout.splitlines(), out, ALL_CHARTS)


@pytest.mark.parametrize("case", ["missing", "no_metrics", "no_records", "only_garbage"])
def test_cli_errors_exit_2(cli, tmp_path, case):
    run = tmp_path / "run"
    if case == "no_metrics":
        run.mkdir()
    elif case == "no_records":
        write_run(run, [], tail="\n")
    elif case == "only_garbage":
        write_run(run, [], tail='{"step": 0, "ki')
    r = cli("plot", str(run))
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    errors = [line for line in r.stderr.splitlines() if "warning" not in line]
    assert len(errors) == 1 and errors[0].startswith("gptlab plot: error:"), r.stderr
    assert not (run / "plots").exists()


def test_plot_does_not_import_torch(tmp_path):
    run = write_run(tmp_path / "run", full_records(5))
    code = ("import sys, gptlab.plot, gptlab.cli; assert 'torch' not in sys.modules, 'torch on import'; "
            f"gptlab.plot.plot_run({str(run)!r}); assert 'torch' not in sys.modules, 'torch on plot'")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr


# ----------------------------------------------------------------------------- several runs in one chart

def shifted_records(steps: int, shift: float, lr: float) -> list:
    recs = []
    for s in range(steps):
        r = train_rec(s)
        r["loss"] += shift
        r["lr"] = lr * min(1.0, (s + 1) / 10)
        recs.append(r)
        if s % 10 == 0 or s == steps - 1:
            v = val_rec(s)
            v["loss"] += shift
            recs.append(v)
    return recs


def test_overlay_draws_every_run_with_a_legend(tmp_path, monkeypatch):
    a = write_run(tmp_path / "adamw", shifted_records(40, 0.5, 3e-3))
    b = write_run(tmp_path / "muon", shifted_records(30, 0.0, 2e-2))
    drawn = {}
    real_save = plot_mod._save

    def keep(fig, path):
        drawn[path.name] = fig
        return real_save(fig, path)

    monkeypatch.setattr(plot_mod, "_save", keep)
    out = tmp_path / "cmp"
    files = plot_runs([a, b], out)
    assert_pngs(files, out, ["loss.png", "lr.png"])
    ax = drawn["loss.png"].axes[0]
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels == ["adamw train (smoothed)", "adamw val", "muon train (smoothed)", "muon val"]
    # each run's val curve is drawn with its own data, in its own colour
    lines = {ln.get_label(): ln for ln in ax.get_lines()}
    assert list(lines["muon val"].get_ydata()) == [r["loss"] for r in shifted_records(30, 0.0, 0) if r["kind"] == "val"]
    assert lines["adamw val"].get_color() != lines["muon val"].get_color()
    assert lines["adamw val"].get_color() == lines["adamw train (smoothed)"].get_color()
    lr_labels = [t.get_text() for t in drawn["lr.png"].axes[0].get_legend().get_texts()]
    assert lr_labels == ["adamw: AdamW", "muon: AdamW"]  # no config.json: AdamW runs


def test_overlay_labels_and_errors(tmp_path):
    assert run_labels([tmp_path / "x" / "run", tmp_path / "y" / "other"]) == ["run", "other"]
    same = [str(tmp_path / "x" / "run"), str(tmp_path / "y" / "run")]
    assert run_labels(same) == same  # names repeat: the paths as given
    good = write_run(tmp_path / "good", full_records(5))
    with pytest.raises(UserError, match="no such run directory"):
        plot_runs([good, tmp_path / "missing"], tmp_path / "out")
    only_hs = write_run(tmp_path / "hs", [hs_rec(0)])
    with pytest.raises(UserError, match="nothing to plot"):
        plot_runs([only_hs], tmp_path / "out2")


def test_cli_overlay(cli, tmp_path):
    a = write_run(tmp_path / "a", full_records(12))
    b = write_run(tmp_path / "b", full_records(8))
    out = tmp_path / "both"
    r = cli("plot", str(a), str(b), "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert_pngs(r.stdout.splitlines(), out, ["loss.png", "lr.png"])
    r = cli("plot", str(a), str(b))
    assert r.returncode == 2 and "--out" in r.stderr and "Traceback" not in r.stderr


# ----------------------------------------------------------------------------- readable charts (issue 24)

@pytest.fixture
def drawn(monkeypatch):
    """{file name: matplotlib Figure} of every chart drawn while the test runs."""
    figs: dict = {}
    real_save = plot_mod._save

    def keep(fig, path):
        figs[path.name] = fig
        return real_save(fig, path)
    monkeypatch.setattr(plot_mod, "_save", keep)
    return figs


def lines_of(ax) -> dict:
    return {ln.get_label(): ln for ln in ax.get_lines()}


def test_long_run_loss_shows_every_point_in_a_log_inset(tmp_path, drawn):
    """From ~14 down to 3: the main axis stops at twice the final loss (the end stays readable), and
    an inset on a log x axis holds every train and val point, the early ones included."""
    recs = full_records(300)
    plot_run(write_run(tmp_path / "run", recs))
    ax = drawn["loss.png"].axes[0]
    train_losses = [r["loss"] for r in recs if r["kind"] == "train"]
    assert ax.get_ylim()[1] < max(train_losses)  # the early points are above the main axis...
    (inset,) = ax.child_axes  # ...and in the inset, all of them
    assert inset.get_xscale() == "log"
    ys = [list(ln.get_ydata()) for ln in inset.get_lines()]
    assert ys[0] == train_losses and ys[1] == [r["loss"] for r in recs if r["kind"] == "val"]
    assert inset.get_ylim()[0] <= min(train_losses) and inset.get_ylim()[1] >= max(train_losses)


def test_short_run_shows_every_point_raw_and_smoothed(tmp_path, drawn):
    """A few dozen noisy steps (10.9 down to 7, as the tiny preset's first 40): no inset and no
    clipping, a dot on every raw point, and a smoothed line that is not the raw line again."""
    recs = [dict(train_rec(s), loss=10.9 - 0.1 * s + (0.3 if s % 2 else -0.3)) for s in range(40)]
    plot_run(write_run(tmp_path / "run", recs))
    ax = drawn["loss.png"].axes[0]
    assert not ax.child_axes
    raw, sm = lines_of(ax)["train loss"], lines_of(ax)["train loss (smoothed over 5 steps)"]
    assert raw.get_marker() == "o" and len(raw.get_ydata()) == 40
    assert ax.get_ylim()[0] <= min(raw.get_ydata()) and ax.get_ylim()[1] >= max(raw.get_ydata())
    gap = max(abs(a - b) for a, b in zip(raw.get_ydata(), sm.get_ydata()))
    assert gap > 0.25, gap  # the zig-zag is smoothed away: two distinct lines
    assert sm.get_linewidth() > raw.get_linewidth() and raw.get_alpha() < 1


def muon_records(steps: int, with_muon_lr: bool = True) -> list:
    recs = []
    for s in range(1, steps + 1):
        r = train_rec(s)
        r["lr"] = 3e-3 * min(1.0, s / 10)
        if with_muon_lr:
            r["muon_lr"] = 0.02 * min(1.0, s / 10)
        recs.append(r)
    return recs


@pytest.mark.parametrize("logged", [True, False], ids=["muon_lr logged", "from config.json"])
def test_muon_run_shows_both_learning_rates_labelled(tmp_path, drawn, logged):
    run = write_run(tmp_path / "run", muon_records(30, logged))
    (run / "config.json").write_text(json.dumps({"model": {"n_layer": 4, "n_embd": 128},
                                                 "train": {"optimizer": "muon", "lr": 3e-3, "muon_lr": 0.02}}))
    plot_run(run)
    ax = drawn["lr.png"].axes[0]
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels == ["AdamW (embeddings, tied head, gains, biases), peak 0.003", "Muon (the blocks' matrices), peak 0.02"]
    adamw, muon = ax.get_lines()
    assert list(muon.get_ydata()) == pytest.approx([0.02 * min(1.0, s / 10) for s in range(1, 31)])
    assert list(adamw.get_ydata()) == pytest.approx([3e-3 * min(1.0, s / 10) for s in range(1, 31)])


def test_adamw_run_lr_is_labelled(tmp_path, drawn):
    plot_run(write_run(tmp_path / "run", [train_rec(s) for s in range(10)]))
    assert [t.get_text() for t in drawn["lr.png"].axes[0].get_legend().get_texts()] == ["AdamW, peak 0.0006"]


def timed_records(steps: int, dt: float) -> list:
    """Train records every dt seconds (the first step's end at dt), and a val record at each 5th."""
    recs = []
    for s in range(1, steps + 1):
        recs.append(dict(train_rec(s), tokens=s * 4096, tok_per_s=4096 / dt, time=1_000_000.0 + s * dt))
        if s % 5 == 0:
            recs.append(val_rec(s))  # no tokens of its own here: the train record's at its step
            del recs[-1]["tokens"]
    return recs


@pytest.mark.parametrize("x, unit, label", [("tokens", 1, "tokens"), ("steps", 1, "step"),
                                            ("time", 1, "wall-clock time (s)")])
def test_x_axis_choice(tmp_path, drawn, x, unit, label):
    recs = timed_records(20, 2.0)
    plot_run(write_run(tmp_path / "run", recs), x=x)
    expect = {"tokens": [s * 4096 for s in range(1, 21)], "steps": list(range(1, 21)),
              "time": [2.0 * s for s in range(1, 21)]}[x]  # time: since the run began (step 1 took 2 s)
    for name in ("loss.png", "lr.png", "throughput.png"):
        ax = drawn[name].axes[0]
        assert ax.get_xlabel() == label, name
        assert list(ax.get_lines()[0].get_xdata()) == pytest.approx(expect), name
    val = lines_of(drawn["loss.png"].axes[0])["val loss"]
    assert list(val.get_xdata()) == pytest.approx([expect[s - 1] for s in (5, 10, 15, 20)])


def test_time_axis_picks_minutes_or_hours(tmp_path, drawn):
    plot_run(write_run(tmp_path / "m", timed_records(20, 60.0)), x="time")
    ax = drawn["loss.png"].axes[0]
    assert ax.get_xlabel() == "wall-clock time (min)"
    assert list(ax.get_lines()[0].get_xdata())[-1] == pytest.approx(20.0)
    a = write_run(tmp_path / "a", timed_records(10, 2.0))
    b = write_run(tmp_path / "b", timed_records(10, 2000.0))  # 5.6 h: both runs in hours
    plot_runs([a, b], tmp_path / "cmp", x="time")
    ax = drawn["loss.png"].axes[0]
    assert ax.get_xlabel() == "wall-clock time (h)"
    assert list(lines_of(ax)["a train (smoothed)"].get_xdata())[-1] == pytest.approx(20 / 3600)


def test_overlay_lr_labels_each_optimizer(tmp_path, drawn):
    a = write_run(tmp_path / "adamw", [train_rec(s) for s in range(1, 11)])
    b = write_run(tmp_path / "muon", muon_records(10))
    (b / "config.json").write_text(json.dumps({"model": {}, "train": {"optimizer": "muon", "lr": 3e-3}}))
    plot_runs([a, b], tmp_path / "cmp", x="steps")
    ax = drawn["lr.png"].axes[0]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["adamw: AdamW", "muon: AdamW", "muon: Muon"]
    assert lines_of(ax)["muon: Muon"].get_linestyle() == "--"
    assert ax.get_xlabel() == "step"


def test_x_axis_errors(cli, tmp_path):
    run = write_run(tmp_path / "run", full_records(5))
    with pytest.raises(UserError, match="choose one of tokens, steps, time"):
        plot_run(run, x="epochs")
    r = cli("plot", str(run), "--x", "epochs")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    r = cli("plot", str(run), "--x", "time")
    assert r.returncode == 0, r.stderr


def test_overlay_loss_inset_holds_every_raw_point(tmp_path, drawn):
    a = write_run(tmp_path / "a", shifted_records(40, 0.5, 3e-3))
    b = write_run(tmp_path / "b", shifted_records(30, 0.0, 2e-2))
    plot_runs([a, b], tmp_path / "cmp")
    ax = drawn["loss.png"].axes[0]
    assert ax.get_ylim()[1] < max(r["loss"] for r in shifted_records(40, 0.5, 0))  # capped...
    (inset,) = ax.child_axes  # ...and each run's raw train and val points are in the inset
    assert inset.get_xscale() == "log"
    got = [list(ln.get_ydata()) for ln in inset.get_lines()]
    want = [[r["loss"] for r in recs if r["kind"] == kind] for recs in (shifted_records(40, 0.5, 0),
                                                                      shifted_records(30, 0.0, 0))
            for kind in ("train", "val")]
    assert got == want
