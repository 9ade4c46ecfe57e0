"""Self-launch (`--nproc N`) behaves as one process does: a user's mistake is one line, once, with
exit status 2 and no torchrun traceback; SIGTERM saves, says how to continue once, and exits 143.
Processes are the point here, so these tests run the CLI in subprocesses (gloo on the CPU)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import make_toy_data, run_gptlab
from gptlab import dist

COMMON = ["--model", "tiny", "--n-layer", "1", "--n-head", "2", "--n-embd", "32", "--seq-len", "32", "--vocab-size", "320",
          "--total-batch-tokens", "512", "--batch-size", "4", "--lr", "3e-3", "--warmup-steps", "2",
          "--eval-every", "0", "--sample-tokens", "0", "--device", "cpu", "--dist-timeout", "60"]
ONE_THREAD = {"OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_toy_data(tmp_path_factory.mktemp("launch") / "data", 20_000, 100_000)


@pytest.fixture(scope="module")
def too_small(tmp_path_factory) -> Path:
    """A train split of 3 windows: accepted by the configuration checks, refused by the loader,
    which only the workers build (after the process group is up)."""
    return make_toy_data(tmp_path_factory.mktemp("launch") / "small", 2_000, 100)


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if "error:" in line]


# ------------------------------------------------------------------------------ unit: the reports

def test_report_error_one_process_prints(capsys, monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv(dist.LAUNCH_DIR_ENV, raising=False)
    dist.report_error("gptlab train: error: x")
    assert capsys.readouterr().err == "gptlab train: error: x\n"


@pytest.mark.parametrize("rank, shown", [("0", True), ("1", False)])
def test_report_error_under_torchrun_rank0_only(capsys, monkeypatch, rank, shown):
    monkeypatch.setenv("RANK", rank)
    monkeypatch.delenv(dist.LAUNCH_DIR_ENV, raising=False)
    dist.report_error("gptlab train: error: x")
    assert capsys.readouterr().err == ("gptlab train: error: x\n" if shown else "")


def test_report_error_under_self_launch_goes_to_the_launcher(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv(dist.LAUNCH_DIR_ENV, str(tmp_path))
    assert not dist.peer_reported_error()
    monkeypatch.setenv("RANK", "1")
    dist.report_error("gptlab train: error: first")
    time.sleep(0.01)
    monkeypatch.setenv("RANK", "0")
    dist.report_error("gptlab train: error: second")
    assert capsys.readouterr().err == ""  # the workers print nothing
    assert dist.peer_reported_error()
    assert dist._first_error(str(tmp_path)) == "gptlab train: error: second"  # rank 0's
    (tmp_path / "error.0.0").unlink()  # error.ATTEMPT.RANK
    monkeypatch.setenv("RANK", "3")
    dist.report_error("gptlab train: error: third")
    assert dist._first_error(str(tmp_path)) == "gptlab train: error: first"  # else the earliest


def test_a_rank_stopped_by_its_peer_says_so_in_one_line_not_a_traceback(capsys, monkeypatch, tmp_path):
    """Rank 0 set "failed" for its section, then was killed or stopped before reporting why (the
    soak met this: a full disk at a save, then SIGSTOP): the waiting rank's Rank0Failed used to end
    in a traceback. Now one report to the launcher, exit status 1."""
    from gptlab import cli

    def raises(args):
        raise dist.Rank0Failed("rank 0 failed during checkpoint and reported no error of its own")

    monkeypatch.setenv(dist.LAUNCH_DIR_ENV, str(tmp_path))
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setitem(cli.COMMANDS, "plot", (*cli.COMMANDS["plot"][:2], raises))
    assert cli.main(["plot", str(tmp_path)]) == 1
    assert capsys.readouterr().err == ""  # the launcher prints it
    assert dist._first_error(str(tmp_path)) == (
        "gptlab plot: rank 1: rank 0 failed during checkpoint and reported no error of its own")
    monkeypatch.setenv("RANK", "0")
    dist.report_error("gptlab plot: error: the real cause")
    monkeypatch.setenv("RANK", "2")
    assert cli.main(["plot", str(tmp_path)]) == 1  # rank 0 said why: nothing more from this one
    assert sorted(p.name for p in tmp_path.iterdir()) == ["error.0.0", "error.0.1"]


# ------------------------------------------------------------------------------ end to end

@pytest.mark.parametrize("resume", [[], ["--resume", "auto"]])
def test_refusal_is_made_before_any_worker_starts(data, tmp_path, resume):
    r = run_gptlab("train", *COMMON, "--data", data, "--out", tmp_path / "r", "--nproc", "2",
                   "--fsdp", "--eval-tasks", "hellaswag", "--max-steps", "3", *resume, env=ONE_THREAD)
    assert r.returncode == 2, r.stderr
    assert r.stderr.splitlines() == [
        "gptlab train: error: --eval-tasks runs the whole model in one process and does not work with "
        "--fsdp; evaluate a checkpoint with `gptlab eval RUN --tasks`"]
    assert not (tmp_path / "r").exists()


@pytest.mark.slow
def test_a_mistake_found_inside_the_workers_is_one_line_once(too_small, tmp_path):
    r = run_gptlab("train", *COMMON, "--data", too_small, "--out", tmp_path / "r", "--nproc", "2",
                   "--max-steps", "3", env=ONE_THREAD)
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr and "ChildFailedError" not in r.stderr, r.stderr
    lines = error_lines(r.stderr)
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("gptlab train: error: ") and "fewer than one global batch" in lines[0]


@pytest.mark.slow
def test_under_a_users_torchrun_only_rank0_prints_the_line(too_small, tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "gptlab", "train", *map(str, COMMON), "--data", str(too_small), "--out", str(tmp_path / "r"),
           "--max-steps", "3"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, **ONE_THREAD})
    assert r.returncode != 0
    assert len([line for line in r.stderr.splitlines() if line.startswith("gptlab train: error:")]) == 1, r.stderr


def sigterm_run(args: list, run: Path, lines: int = 3, timeout: float = 240) -> tuple[int, str]:
    proc = subprocess.Popen([sys.executable, "-m", "gptlab", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, **ONE_THREAD})
    metrics, deadline = run / "metrics.jsonl", time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and metrics.read_text().count("\n") >= lines:
            break
        time.sleep(0.05)
    assert proc.poll() is None, proc.communicate()[1]
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=timeout)
    return proc.returncode, err


@pytest.mark.slow
def test_sigterm_to_a_self_launched_run_saves_and_exits_as_one_process(data, tmp_path):
    args = ["train", *COMMON, "--data", data, "--max-steps", "5000", "--checkpoint-every", "0"]
    one_code, one_err = sigterm_run([*args, "--out", tmp_path / "one"], tmp_path / "one")
    two_code, err = sigterm_run([*args, "--out", tmp_path / "two", "--nproc", "2"], tmp_path / "two")
    assert one_code == 143, one_err
    assert two_code == one_code, err
    assert "Traceback" not in err and "SignalException" not in err, err
    cont = [line for line in err.replace("\r", "\n").splitlines() if "Continue with:" in line]
    assert len(cont) == 1 and "stopped by SIGTERM" in cont[0], err
    assert f"gptlab train --out {tmp_path / 'two'} --resume" in cont[0]
    latest = (tmp_path / "two" / "checkpoints" / "latest").read_text().strip()
    assert (tmp_path / "two" / "checkpoints" / latest).is_dir()
