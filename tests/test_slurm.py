"""examples/slurm/train.sbatch under a real single-node SLURM cluster (tests/slurm/cluster.sh):
the job is requeued mid-run, by the scheduler (scontrol requeue) or by itself when the time limit
nears (its USR1 signal), and still finishes with the per-step losses of an unbroken run.

Needs Debian's slurmctld, slurmd, slurm-client and munge, and root (`make slurm` installs them).
Where they are absent the tests are skipped, naming why; with GPTLAB_REQUIRE_SLURM=1 (CI sets it)
they fail instead."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from conftest import make_toy_data

ROOT = Path(__file__).resolve().parent.parent
CLUSTER = ROOT / "tests" / "slurm" / "cluster.sh"
SBATCH = ROOT / "examples" / "slurm" / "train.sbatch"
STEPS = 40
# tiny: 2 layers of width 32 on the CPU, 2 ranks over gloo
FLAGS = ["--model", "tiny", "--n-layer", "2", "--n-head", "2", "--n-embd", "32", "--seq-len", "32", "--vocab-size", "320",
         "--batch-size", "4", "--total-batch-tokens", "256", "--max-steps", str(STEPS), "--lr", "1e-2",
         "--warmup-steps", "3", "--eval-every", "0", "--sample-tokens", "0", "--checkpoint-every", "5",
         "--device", "cpu"]
RANKS = 2

pytestmark = pytest.mark.slow


def _missing() -> str | None:
    absent = [b for b in ("slurmctld", "slurmd", "sbatch", "scontrol", "munged", "mungekey") if not shutil.which(b)]
    if absent:
        return (f"SLURM is not installed ({', '.join(absent)} not found): "
                "apt-get install slurmctld slurmd slurm-client munge, or `make slurm`")
    if os.geteuid() != 0:
        return "the test SLURM cluster needs root (slurmd starts jobs as their users)"
    return None


@pytest.fixture(scope="module")
def cluster():
    why = _missing()
    if why:
        if os.environ.get("GPTLAB_REQUIRE_SLURM") == "1":
            pytest.fail(why)
        pytest.skip(why)
    # not under pytest's tmp_path: munged needs every folder on the way to its socket traversable
    d = Path(tempfile.mkdtemp(prefix="gptlab-slurm-"))
    r = subprocess.run(["bash", str(CLUSTER), "start", str(d)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, f"the SLURM cluster did not start:\n{r.stdout}{r.stderr}"
    env = {**os.environ, "SLURM_CONF": str(d / "slurm.conf")}
    try:
        yield env
    finally:
        subprocess.run(["bash", str(CLUSTER), "stop", str(d)], capture_output=True, timeout=120)
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return make_toy_data(tmp_path_factory.mktemp("data"), 20_000, 100_000)


def losses(run: Path) -> dict[int, float]:
    train = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in train if r["kind"] == "train"]
    assert len(train) == len({r["step"] for r in train}), "a step logged twice"
    return {r["step"]: r["loss"] for r in train}


@pytest.fixture(scope="module")
def unbroken(data_dir, tmp_path_factory) -> dict[int, float]:
    """The same training, never interrupted, under a plain torchrun with the same number of ranks."""
    run = tmp_path_factory.mktemp("unbroken") / "run"
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={RANKS}",
                        "-m", "gptlab", "train", "--data", str(data_dir), "--out", str(run), *FLAGS],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return losses(run)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def job_info(job: str, env: dict) -> dict[str, str]:
    out = subprocess.run(["scontrol", "show", "job", "--oneliner", job], capture_output=True, text=True,
                         env=env, timeout=30).stdout
    return dict(re.findall(r"(\w+)=(\S*)", out))


def wait_for(what: str, check, timeout: float, log: Path):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.2)
    tail = log.read_text(errors="replace")[-4000:] if log.exists() else "(no log)"
    pytest.fail(f"timed out waiting for {what}; the job's log ends:\n{tail}")


def time_limit_signal() -> str:
    """The signal the example asks for before its time limit; it must go to the batch script (B:),
    and the job must be requeueable, with one log over its starts."""
    directives = re.findall(r"^#SBATCH (\S+)", SBATCH.read_text(), flags=re.M)
    assert "--requeue" in directives and "--open-mode=append" in directives, directives
    found = [m.group(1) for d in directives if (m := re.fullmatch(r"--signal=B:(\w+)@\d+", d))]
    assert len(found) == 1, directives
    return found[0]


def steps_logged(run: Path) -> int:
    try:
        return sum(1 for line in (run / "metrics.jsonl").read_text().splitlines() if '"train"' in line)
    except FileNotFoundError:
        return 0


@pytest.mark.parametrize("interrupt", ["scontrol requeue", "time limit"])
def test_requeued_job_finishes_equal_to_an_unbroken_run(cluster, data_dir, unbroken, tmp_path, interrupt):
    run, log = tmp_path / "run", tmp_path / "job.out"
    env = {**cluster, "GPTLAB_DATA": str(data_dir), "GPTLAB_RUN": str(run), "GPTLAB_FLAGS": " ".join(FLAGS),
           "GPTLAB_NPROC_PER_NODE": str(RANKS), "GPTLAB_PYTHON": sys.executable,
           "GPTLAB_RDZV_PORT": str(free_port())}
    r = subprocess.run(["sbatch", "--parsable", f"--output={log}", f"--chdir={tmp_path}", str(SBATCH)],
                       capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 0, r.stderr
    job = r.stdout.strip().split(";")[0]
    try:
        # past the first checkpoint (step 5), with most of the run still to go
        wait_for("the job to train 8 steps", lambda: steps_logged(run) >= 8, 300, log)
        if interrupt == "scontrol requeue":  # SIGTERM to every process of the job, SIGKILL KillWait later
            cmd = ["scontrol", "requeue", job]
        else:  # what the script's --signal=B:SIG@SECONDS sends before the time limit: to the script alone
            cmd = ["scancel", f"--signal={time_limit_signal()}", "--batch", job]
        r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=30)
        assert r.returncode == 0, r.stderr
        final = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL"}
        info = wait_for("the job to end", lambda: (i := job_info(job, env)).get("JobState") in final and i,
                        600, log)
        text = log.read_text(errors="replace")
        assert info["JobState"] == "COMPLETED", text[-4000:]
        assert info["Restarts"] == "1", info
    finally:
        subprocess.run(["scancel", job], env=env, capture_output=True, timeout=30)

    # one log over both starts (--open-mode=append)
    assert f"job {job} start 1" in text and f"job {job} start 2" in text, text[-4000:]
    # the workers got SIGTERM and saved at a step boundary mid-run; the second start resumed there
    stopped = re.findall(r"stopped by SIGTERM at step (\d+); checkpoint saved", text)
    assert stopped, text[-4000:]
    at = int(stopped[0])
    assert 8 <= at < STEPS
    assert f"resumed from {run / 'checkpoints' / f'step_{at:06d}'} at step {at}" in text
    if interrupt == "time limit":
        assert "requeueing job" in text
    got = losses(run)
    assert sorted(got) == list(range(1, STEPS + 1))
    assert got == unbroken  # bit-identical floats: same ranks, same order of every sum
