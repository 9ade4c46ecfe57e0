"""Elastic restarts: a worker SIGKILLed mid-run, torchrun (or gptlab's own --nproc launcher)
starts the group again, `--resume auto` continues it from the latest checkpoint, and the finished
run's per-step losses are an unbroken 2-rank run's. Processes are the point, so these run them."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from conftest import make_toy_data, metrics_by_step, read_metrics, run_gptlab
from gptlab import dist

STEPS = 36
ENV = {"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}  # 2 ranks on 2 shared cores


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_toy_data(tmp_path_factory.mktemp("data"), 20_000, 100_000)


def train_args(data: Path, out: Path, *extra) -> list[str]:
    return ["train", "--model", "tiny", "--n-layer", "2", "--n-head", "2", "--n-embd", "32", "--seq-len", "32", "--vocab-size", "320",
            "--data", str(data), "--batch-size", "4", "--total-batch-tokens", "256", "--max-steps", str(STEPS),
            "--lr", "1e-2", "--warmup-steps", "3", "--eval-every", "0", "--sample-tokens", "0",
            "--checkpoint-every", "4", "--device", "cpu", "--out", str(out), *extra]


def torchrun(*args) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *args]


def losses(run: Path) -> dict[int, float]:
    """The loss of each step, the last record of a step winning (a redone step's)."""
    return {step: r["loss"] for step, r in metrics_by_step(run, "train").items()}


@pytest.fixture(scope="module")
def unbroken(data, tmp_path_factory) -> dict[int, float]:
    run = tmp_path_factory.mktemp("unbroken") / "run"
    r = subprocess.run(torchrun("-m", "gptlab", *train_args(data, run)), capture_output=True, text=True,
                       env={**os.environ, **ENV}, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    got = losses(run)
    assert sorted(got) == list(range(1, STEPS + 1))
    return got


def run_and_kill(cmd: list[str], run: Path, rank: int, after_steps: int = 10, timeout: float = 300):
    """Start `cmd` (a launcher of 2 workers), SIGKILL the worker of `rank` once `after_steps` steps are
    logged (a checkpoint every 4 is on disk by then), and wait for the launcher to finish.
    Returns (exit status, output, the step logged last before the kill)."""
    log = run.parent / f"{run.name}.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **ENV})
        metrics = run / "metrics.jsonl"
        deadline = time.time() + timeout
        try:
            while True:
                assert time.time() < deadline and proc.poll() is None, log.read_text()[-3000:]
                if metrics.exists() and metrics.read_text().count("\n") >= after_steps:
                    break
                time.sleep(0.01)
            workers = {int(p.environ().get("RANK", -1)): p for p in psutil.Process(proc.pid).children()}
            killed_at = max(metrics_by_step(run, "train"))
            workers[rank].send_signal(signal.SIGKILL)
            proc.wait(timeout=max(1.0, deadline - time.time()))
        finally:
            stop(proc)
    return proc.returncode, log.read_text(), killed_at


def stop(proc: subprocess.Popen) -> None:
    """Kill a launcher still running (a failed test) and its workers, which would outlive it."""
    if proc.poll() is None:
        try:
            for child in psutil.Process(proc.pid).children(recursive=True):
                child.kill()
        except psutil.NoSuchProcess:
            pass
        proc.kill()
        proc.wait()


@pytest.mark.slow
@pytest.mark.parametrize("rank", [0, 1])  # rank 0 holds the run directory's lock
def test_torchrun_restart_after_a_sigkill_equals_the_unbroken_run(data, tmp_path, unbroken, rank):
    run = tmp_path / "run"
    cmd = torchrun("--max-restarts", "3", "-m", "gptlab", *train_args(data, run, "--resume", "auto"))
    code, out, killed_at = run_and_kill(cmd, run, rank)
    assert code == 0, out[-4000:]
    assert killed_at < STEPS  # killed mid-run
    assert "gptlab train: resumed from" in out  # the restarted group continued a checkpoint
    assert "exitcode: -9" in out  # torchrun saw the killed worker
    got = losses(run)
    assert sorted(got) == sorted(unbroken)
    worst = max(abs(got[s] - unbroken[s]) for s in unbroken)
    assert worst <= 1e-6, worst  # measured: 0.0 (bit-identical floats on the CPU)
    steps = [r["step"] for r in read_metrics(run, "train")]
    assert len(steps) == len(set(steps)), "a redone step is logged twice"  # the resume drops them


# A worker entry point that stops rank 0 of the first attempt in the middle of its 2nd checkpoint
# (step 8): the weights are written to the save's temporary directory, nothing is renamed, and a
# marker file says so. The test SIGKILLs it there.
HALF_SAVE = """
import os, sys, time
from gptlab import checkpoint
from gptlab.cli import main

real, calls = checkpoint._write_model_files, []

def write_then_hang(model, path, weights=None):
    real(model, path, weights)
    calls.append(path)
    if len(calls) == 2 and os.environ.get("TORCHELASTIC_RESTART_COUNT") == "0":
        open(os.environ["HALF_SAVED"], "w").write(str(path))
        time.sleep(300)

checkpoint._write_model_files = write_then_hang
sys.exit(main())
"""


@pytest.mark.slow
def test_a_rank0_killed_in_the_middle_of_a_save_restarts_from_the_checkpoint_before(data, tmp_path, unbroken):
    script = tmp_path / "half_save.py"
    script.write_text(HALF_SAVE)
    marker = tmp_path / "half_saved"
    run = tmp_path / "run"
    cmd = torchrun("--max-restarts", "1", str(script), *train_args(data, run, "--resume", "auto"))
    log = tmp_path / "log"
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT,
                                env={**os.environ, **ENV, "HALF_SAVED": str(marker)})
        try:
            deadline = time.time() + 200
            while not marker.exists():
                assert time.time() < deadline and proc.poll() is None, log.read_text()[-3000:]
                time.sleep(0.01)
            stage = Path(marker.read_text())
            assert stage.parent == run / "checkpoints" and stage.is_dir()  # half a save, not yet renamed
            assert [p.name for p in (run / "checkpoints").glob("step_*")] == ["step_000004"]
            workers = {int(p.environ().get("RANK", -1)): p for p in psutil.Process(proc.pid).children()}
            workers[0].send_signal(signal.SIGKILL)
            proc.wait(timeout=200)
        finally:
            stop(proc)
    out = log.read_text()
    assert proc.returncode == 0, out[-4000:]
    assert "resumed from" in out and "step_000004 at step 4" in out  # not the half-written step 8
    assert not stage.exists()  # the dead writer's temporary is cleared
    assert all(p.name.startswith("step_") or p.name == "latest" for p in (run / "checkpoints").iterdir())
    got = losses(run)
    assert sorted(got) == sorted(unbroken)
    assert max(abs(got[s] - unbroken[s]) for s in unbroken) <= 1e-6


@pytest.mark.slow
def test_self_launch_restart_after_a_sigkill_equals_the_unbroken_run(data, tmp_path, unbroken):
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "gptlab", *train_args(data, run, "--nproc", "2", "--max-restarts", "2",
                                                        "--resume", "auto")]
    code, out, killed_at = run_and_kill(cmd, run, rank=1)
    assert code == 0, out[-4000:]
    assert killed_at < STEPS
    assert "torchrun --standalone --nproc_per_node=2 --max-restarts=2" in out  # the launcher's command
    # the restart is announced, once (it was silent before)
    assert out.count("gptlab train: restarting the workers (restart 1 of 2) after: a worker exited or was killed") == 1, out[-3000:]
    assert "gptlab train: resumed from" in out
    got = losses(run)
    assert sorted(got) == sorted(unbroken)
    assert max(abs(got[s] - unbroken[s]) for s in unbroken) <= 1e-6


@pytest.mark.parametrize("resume", [[], ["--resume"]])
def test_max_restarts_without_resume_auto_is_refused_before_launch(data, tmp_path, resume):
    r = run_gptlab(*train_args(data, tmp_path / "r", "--nproc", "2", "--max-restarts", "1", *resume), env=ENV)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "--max-restarts needs --resume auto" in lines[0], r.stderr
    assert "launching" not in r.stderr and not (tmp_path / "r").exists()


def test_max_restarts_without_nproc_is_refused(data, tmp_path, cli):
    r = cli(*train_args(data, tmp_path / "r", "--max-restarts", "1", "--resume", "auto"))
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [r.stderr.strip()] and "--nproc" in r.stderr


def test_max_restarts_is_not_saved(data, tmp_path, cli):
    from gptlab.config import TrainConfig, launch_only

    assert "max_restarts" in launch_only(TrainConfig)
    r = cli(*train_args(data, tmp_path / "r", "--max-steps", "1", "--max-restarts", "0", "--resume", "auto"))
    assert r.returncode == 0, r.stderr
    saved = json.loads((tmp_path / "r" / "config.json").read_text())
    assert "max_restarts" not in saved["train"] and "dist_timeout" not in saved["train"]


# ------------------------------------------------------------------ unit: the reports of each attempt

def test_error_reports_are_kept_per_attempt(monkeypatch, tmp_path):
    """A restarted group's workers must not take an earlier attempt's report for a peer's, else
    they stay quiet about their own failure; the launcher shows the reports of the attempt asked."""
    monkeypatch.setenv(dist.LAUNCH_DIR_ENV, str(tmp_path))
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "0")
    dist.report_error("gptlab train: error: attempt 0")
    assert dist.peer_reported_error()
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    assert not dist.peer_reported_error()  # attempt 1 has reported nothing yet
    assert dist._first_error(str(tmp_path), 1) is None
    assert dist._first_error(str(tmp_path), 0) == "gptlab train: error: attempt 0"
    dist.report_error("gptlab train: error: attempt 1")
    assert dist.peer_reported_error()
    assert dist._first_error(str(tmp_path), 1) == "gptlab train: error: attempt 1"
    assert dist._first_error(str(tmp_path)) == "gptlab train: error: attempt 1"  # the latest by default


def test_self_launch_hands_restarts_and_a_shutdown_timeout_to_torchrun(monkeypatch):
    from torch.distributed import run as torchrun_mod

    seen = []
    monkeypatch.setattr(torchrun_mod, "run", lambda config: seen.append(config))
    monkeypatch.delenv("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", raising=False)
    assert dist.self_launch(2, ["train", "--nproc", "2", "--max-restarts", "3", "--out", "x"], max_restarts=3) == 0
    assert seen[0].max_restarts == 3 and seen[0].shutdown_timeout == dist.SHUTDOWN_TIMEOUT_S
    assert "--nproc" not in seen[0].training_script_args and "--max-restarts" not in seen[0].training_script_args
    monkeypatch.setenv("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", "600")  # the user's own setting wins
    assert dist.self_launch(2, ["train", "--out", "x"]) == 0
    assert seen[1].max_restarts == 0 and seen[1].shutdown_timeout == 600


def test_a_restart_is_announced_with_the_error_of_the_attempt_that_failed(monkeypatch, tmp_path, capsys):
    """torchrun's agent announces a restart at INFO level; the launcher turns it into one line naming
    the failed attempt's reported error (a restart was silent before: a streamed run whose server
    went away restarted with nothing said)."""
    import logging

    monkeypatch.setenv(dist.LAUNCH_DIR_ENV, str(tmp_path))
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    dist.report_error("gptlab train: error: http://x/d: cannot fetch shard 3 (connection refused)")
    handler = dist._Restarts("train", str(tmp_path))
    notice = "[%s] Worker group %s. %s/%s attempts left; will restart worker group"
    for left in (3, 2):  # attempt 0 reported nothing, attempt 1 the error above
        handler.handle(logging.LogRecord(dist._AGENT_LOGGER, logging.INFO, __file__, 1, notice,
                                         ("default", "FAILED", left, 3), None))
    handler.handle(logging.LogRecord(dist._AGENT_LOGGER, logging.INFO, __file__, 1, "something else", (), None))
    assert capsys.readouterr().err.splitlines() == [
        "gptlab train: restarting the workers (restart 1 of 3) after: a worker exited or was killed "
        "(its output is above)",
        "gptlab train: restarting the workers (restart 2 of 3) after: error: http://x/d: cannot fetch shard 3 "
        "(connection refused)"]
