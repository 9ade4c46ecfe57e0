"""RunDir: the one owner of a run directory's paths, its `latest` pointer and its lock."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

from gptlab import atomic
from gptlab.errors import UserError
from gptlab.metrics import MetricsLogger
from gptlab.rundir import RunDir


def test_paths(tmp_path):
    run = RunDir(tmp_path / "r")
    assert run.config_path == tmp_path / "r" / "config.json"
    assert run.metrics_path.name == "metrics.jsonl"
    assert run.checkpoint_path(12) == tmp_path / "r" / "checkpoints" / "step_000012"
    assert run.plots_dir.name == "plots" and run.samples_path.name == "samples.txt"


def test_latest_and_prune(tmp_path):
    run = RunDir(tmp_path)
    assert run.latest_checkpoint() is None
    for s in (1, 2, 3):
        run.checkpoint_path(s).mkdir(parents=True)
    assert run.latest_checkpoint().name == "step_000003"  # no pointer: the newest
    run.mark_latest(run.checkpoint_path(1))
    assert run.latest_checkpoint().name == "step_000001"
    run.prune(1)  # keeps the newest and the one `latest` names
    assert [p.name for p in run.checkpoints()] == ["step_000001", "step_000003"]


def test_latest_never_points_outside_the_run(tmp_path):
    run = RunDir(tmp_path / "run")
    run.checkpoint_path(1).mkdir(parents=True)
    (tmp_path / "elsewhere").mkdir()
    (run.checkpoints_dir / "latest").write_text("../../elsewhere\n")
    assert run.latest_checkpoint() == run.checkpoint_path(1)


def test_stale_temps_removed(tmp_path):
    run = RunDir(tmp_path)
    (run.checkpoints_dir / ".step_000002.tmp-999").mkdir(parents=True)
    run.checkpoint_path(1).mkdir()
    run.remove_stale_temps()
    assert [p.name for p in run.checkpoints_dir.iterdir()] == ["step_000001"]


def test_lock_refuses_a_second_writer_and_dies_with_its_process(tmp_path):
    code = textwrap.dedent(f"""
        import sys, time
        from gptlab.rundir import RunDir
        RunDir({str(tmp_path)!r}).lock()
        print("locked", flush=True)
        time.sleep(60)
    """)
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(UserError, match=f"in use by process {holder.pid}"):
            RunDir(tmp_path).lock()
    finally:
        holder.kill()
        holder.wait()
    run = RunDir(tmp_path)  # the dead holder's lock file is stale, and does not block
    run.lock()
    run.unlock()


def test_out_naming_a_file_is_one_error(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(UserError, match="not a directory"):
        RunDir(tmp_path / "f").lock()


def test_every_kind_of_leftover_is_removed(tmp_path):
    """The one spelling (.NAME.tmp-PID) everywhere in a run, and what today's main left."""
    run = RunDir(tmp_path)
    run.checkpoint_path(1).mkdir(parents=True)
    run.plots_dir.mkdir()
    (run.plots_dir / "loss.png").write_bytes(b"png")
    (run.checkpoints_dir / "latest").write_text("step_000001\n")
    leftovers = [run.checkpoints_dir / n for n in (
        ".step_000002.tmp-999", ".step_000001.old.tmp-999", ".step_000000.deleting.tmp-999",  # this spelling
        ".tmp-step_000002-998", ".step_000001.old-998", ".tmp-deleting-step_000000-998")]  # the old ones
    for p in leftovers:
        p.mkdir()
        (p / "model.safetensors").write_bytes(b"x" * 100)
    for p in (run.checkpoints_dir / ".latest.tmp-999", run.checkpoints_dir / ".latest.tmp",
              tmp_path / ".config.json.tmp-999", tmp_path / ".metrics.jsonl.tmp-999",
              tmp_path / "config.json.tmp", tmp_path / "metrics.jsonl.tmp",
              run.plots_dir / ".loss.png.tmp-999", run.plots_dir / ".lr.png.998.tmp"):
        p.write_text("{")
    removed = run.remove_stale_temps()
    assert len(removed) == 14
    assert sorted(p.name for p in run.checkpoints_dir.iterdir()) == ["latest", "step_000001"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoints", "plots"]
    assert [p.name for p in run.plots_dir.iterdir()] == ["loss.png"]


def test_only_gptlab_temporaries_are_removed(tmp_path):
    """Files of the user's that merely look temporary stay: only the one spelling and the exact
    names earlier versions wrote are removed."""
    run = RunDir(tmp_path)
    run.checkpoint_path(1).mkdir(parents=True)
    keep = [tmp_path / "notes.tmp", tmp_path / ".tmp-notes", tmp_path / "data.tmp-12",
            tmp_path / ".notes.txt.tmp-12",  # the one spelling, but not for a file of the run's
            run.checkpoints_dir / "mine.tmp", run.checkpoints_dir / ".step_000001.tmp-abc"]
    for p in keep:
        p.write_text("mine")
    assert run.remove_stale_temps() == []
    assert all(p.exists() for p in keep)


def test_prune_never_leaves_a_partial_checkpoint(tmp_path, monkeypatch):
    run = RunDir(tmp_path)
    for s in (1, 2, 3):
        run.checkpoint_path(s).mkdir(parents=True)
        (run.checkpoint_path(s) / "model.safetensors").write_bytes(b"x")
    deleted = []
    # a kill in the middle of deleting: the directory being deleted already has its temporary name
    monkeypatch.setattr(atomic.shutil, "rmtree", lambda p, ignore_errors=False: deleted.append(p))
    run.prune(2)
    assert [p.name for p in run.checkpoints()] == ["step_000002", "step_000003"]
    assert deleted and deleted[0].name == f".step_000001.deleting.tmp-{os.getpid()}"
    monkeypatch.undo()
    assert run.remove_stale_temps() == deleted  # the next start clears what the kill left


def _records(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_metrics_torn_line_and_redone_steps_are_dropped_on_resume(tmp_path):
    run = RunDir(tmp_path)
    log = MetricsLogger(run)
    for step in (1, 2, 3):
        log.log({"step": step, "kind": "train", "loss": 1.0 / step})
    log.log({"step": 2, "kind": "val", "loss": 0.7})
    log.close()
    with open(run.metrics_path, "a") as f:
        f.write('{"step": 4, "kind": "train", "lo')  # torn by a kill
    log = MetricsLogger(run, resume=True, resume_step=2)  # the checkpoint was at step 2
    log.log({"step": 3, "kind": "train", "loss": 0.3})
    log.close()
    assert [(r["step"], r["kind"]) for r in _records(run.metrics_path)] == [
        (1, "train"), (2, "train"), (2, "val"), (3, "train")]
    assert _records(run.metrics_path)[-1]["loss"] == 0.3


def test_metrics_of_a_new_run_start_a_new_file(tmp_path):
    run = RunDir(tmp_path)
    run.metrics_path.write_text('{"step": 9, "kind": "train"}\n')
    log = MetricsLogger(run)
    log.log({"step": 1, "kind": "train", "loss": float("nan")})  # NaN is written as null
    log.close()
    assert _records(run.metrics_path) == [{"step": 1, "kind": "train", "loss": None}]


def test_full_disk_writing_the_config_is_one_error_and_keeps_the_old_one(tmp_path, monkeypatch):
    import errno

    from gptlab import atomic
    from gptlab.atomic import DiskFullError

    run = RunDir(tmp_path)
    run.write_config({"n_layer": 1}, {"lr": 1.0})
    before = run.config_path.read_text()

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(atomic.json, "dump", full)
    with pytest.raises(DiskFullError, match=f"no space left on the disk mounted at .* while writing {run.config_path}$"):
        run.write_config({"n_layer": 2}, {"lr": 2.0})
    assert run.config_path.read_text() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json"]
