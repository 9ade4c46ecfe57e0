"""RunDir: the one owner of a run directory's paths, its `latest` pointer and its lock."""

import subprocess
import sys
import textwrap

import pytest

from gptlab.errors import UserError
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
    (run.checkpoints_dir / ".tmp-step_000002-999").mkdir(parents=True)
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
