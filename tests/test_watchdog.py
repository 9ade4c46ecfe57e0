"""Rank-0-only work never trips --dist-timeout (the other ranks wait through the store), and the
stall watchdog (--stall-timeout) turns a hung job into stack dumps in RUN/stalls/ and an exit that
a launcher restarts, after which --resume auto continues exactly. CPU/gloo, 2 ranks."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import WRITE_RESULT, make_toy_data, metrics_by_step, rank_results

from gptlab import watchdog

TINY = ["--model", "tiny", "--n-layer", "1", "--n-head", "2", "--n-embd", "32", "--seq-len", "32", "--vocab-size", "320",
        "--total-batch-tokens", "512", "--batch-size", "4", "--lr", "3e-3", "--warmup-steps", "2",
        "--eval-tokens", "1024", "--sample-tokens", "0", "--device", "cpu"]
# the same without --vocab-size: a model that reads text (the harness tasks need one)
TEXT = [a for i, a in enumerate(TINY) if "--vocab-size" not in (a, TINY[i - 1])]


def env(**extra):
    e = dict(os.environ)
    e["OMP_NUM_THREADS"] = "1"
    e.update({k: str(v) for k, v in extra.items()})
    return e


def torchrun(script: Path, *args, extra=()):
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *extra,
            str(script), *args]


# ----------------------------------------------------------------------------- the watchdog alone

WATCHED = """
import sys, time
from gptlab.watchdog import Watchdog
mode, where = sys.argv[1], sys.argv[2]
def stuck_here():
    time.sleep(30)
with Watchdog(0.6, where, rank=7) as w:
    if mode == "stall":
        stuck_here()
    else:  # beats, then a paused window longer than the timeout: never fires
        for _ in range(15):
            time.sleep(0.1)
            w.beat()
        with w.paused():
            time.sleep(1.5)
        time.sleep(0.3)
print("finished")
"""


def test_watchdog_dumps_every_stack_and_exits_3(tmp_path):
    t0 = time.time()
    r = subprocess.run([sys.executable, "-c", WATCHED, "stall", str(tmp_path / "stalls")], capture_output=True,
                       text=True, timeout=60, env=env())
    assert r.returncode == watchdog.EXIT_CODE == 3, r.stderr
    assert time.time() - t0 < 20
    assert "finished" not in r.stdout
    dumps = list((tmp_path / "stalls").glob("rank7-*.txt"))
    assert len(dumps) == 1, dumps
    text = dumps[0].read_text()
    assert "no step finished" in text and "stuck_here" in text and "gptlab-watchdog" not in text.split("\n")[0]
    assert "rank 7: no step finished" in r.stderr and str(dumps[0]) in r.stderr


def test_watchdog_fed_or_paused_never_fires(tmp_path):
    r = subprocess.run([sys.executable, "-c", WATCHED, "beat", str(tmp_path / "stalls")], capture_output=True,
                       text=True, timeout=60, env=env())
    assert r.returncode == 0 and "finished" in r.stdout, r.stderr
    assert not (tmp_path / "stalls").exists()


def test_default_timeout_is_on_for_several_ranks_only():
    assert watchdog.timeout_for(None, 2) == watchdog.DEFAULT_TIMEOUT > 0
    assert watchdog.timeout_for(None, 1) == 0
    assert watchdog.timeout_for(0, 8) == 0 and watchdog.timeout_for(5, 1) == 5


def test_negative_stall_timeout_is_one_line(cli, tmp_path):
    r = cli("train", "--stall-timeout", "-1", "--out", str(tmp_path / "r"), "--model", "tiny", "--device", "cpu",
            "--data", str(tmp_path))
    assert r.returncode == 2 and r.stderr.strip().endswith("--stall-timeout must be >= 0 (0: no watchdog)"), r.stderr


# ----------------------------------------------------------------------------- rank-0-only work

SECTION = WRITE_RESULT + """
import sys, time, torch
from gptlab import dist
mode = sys.argv[1]
env = dist.init("cpu", timeout_s=6)
def slow():
    time.sleep(14)  # longer than the collective timeout
    if mode == "error":
        raise OSError("rank 0's work failed")
    return "done"
try:
    if mode == "barrier":  # what a plain barrier does: the waiting rank's collective times out
        out = slow() if env.is_main else None
        dist.barrier()
    else:
        out = dist.rank0_only("work", slow)
    t = dist.all_reduce_sum(torch.ones(1))
    write_result(out=out, total=t.item())
except Exception as e:
    write_result(error=type(e).__name__)
    if env.is_main:
        time.sleep(3)  # torchrun ends the others when one exits: rank 1 has time to report first
    raise
finally:
    dist.shutdown()
"""


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["store", "barrier", "error"])
def test_rank0_work_longer_than_the_collective_timeout(tmp_path, mode):
    script = tmp_path / "section.py"
    script.write_text(SECTION)
    (tmp_path / "res").mkdir()
    r = subprocess.run(torchrun(script, mode), capture_output=True, text=True, timeout=240,
                       env=env(RESULT_DIR=tmp_path / "res"))
    if mode == "store":
        assert r.returncode == 0, r.stderr[-3000:]
        assert rank_results(tmp_path / "res", 2) == [{"rank": 0, "out": "done", "total": 2.0},
                                                       {"rank": 1, "out": None, "total": 2.0}]
    elif mode == "barrier":  # the test can fail: the same wait in a barrier aborts the job
        assert r.returncode != 0
        assert rank_results_partial(tmp_path / "res", 1) == {"rank": 1, "error": "RuntimeError"}, r.stderr[-3000:]
        assert "Timed out waiting 6000ms" in r.stderr
    else:  # rank 0 failed: the waiting rank is told, instead of waiting for ever
        assert r.returncode != 0
        assert rank_results_partial(tmp_path / "res", 1) == {"rank": 1, "error": "Rank0Failed"}
        assert rank_results_partial(tmp_path / "res", 0) == {"rank": 0, "error": "OSError"}


def test_shutdown_lets_go_of_the_process_group(tmp_path):
    """The rank-0 section namespace held the destroyed process group until interpreter exit, where
    gloo then aborted the process (exit -6) in about one run in five of the test above."""
    import torch.distributed as tdist

    from gptlab import dist

    tdist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        assert dist.rank0_only("work", lambda: 7) == 7
    finally:
        dist.shutdown()

    def groups(obj, depth=0):
        if isinstance(obj, tdist.ProcessGroup):
            return [obj]
        if isinstance(obj, (tuple, list)) and depth < 3:
            return [g for x in obj for g in groups(x, depth + 1)]
        return []

    assert not tdist.is_initialized()
    assert [name for name, v in vars(dist).items() if groups(v)] == []


def rank_results_partial(result_dir: Path, rank: int) -> dict:
    import json

    return json.loads((result_dir / f"rank{rank}.json").read_text())


# ----------------------------------------------------------------------------- training under torchrun

# gptlab train under torchrun with test hooks put in from outside: a slow single-file checkpoint
# write, a slow fake --eval-tasks runner, a plain barrier instead of rank0_only, a slow step.
TRAIN = """
import os, sys, time
import gptlab.checkpoint, gptlab.train
from gptlab import dist
slow_save, slow_tasks = float(os.environ.get("SLOW_SAVE", 0)), float(os.environ.get("SLOW_TASKS", 0))
step_sleep = float(os.environ.get("STEP_SLEEP", 0))
save = gptlab.checkpoint.save_checkpoint
def slow_save_checkpoint(*a, **k):
    time.sleep(slow_save)
    return save(*a, **k)
gptlab.checkpoint.save_checkpoint = slow_save_checkpoint
class SlowTasks:
    def run_during_training(self, model, device, dtype):
        time.sleep(slow_tasks)
        return {"fake": {"acc": 0.5}}
gptlab.train._task_runner = lambda cfg: SlowTasks()
if os.environ.get("PLAIN_BARRIER"):
    def rank0_only(name, work, timeout=None):
        out = work() if dist.env_from_torchrun().is_main else None
        dist.barrier()
        return out
    dist.rank0_only = rank0_only
step = gptlab.train.Trainer.train_step
def slow_step(self, *a, **k):
    out = step(self, *a, **k)
    time.sleep(step_sleep)
    return out
gptlab.train.Trainer.train_step = slow_step
from gptlab.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return make_toy_data(tmp_path_factory.mktemp("wdata"), 20_000, 100_000)


@pytest.fixture(scope="module")
def train_script(tmp_path_factory):
    p = tmp_path_factory.mktemp("wscript") / "train_hooked.py"
    p.write_text(TRAIN)
    return p


@pytest.mark.slow
@pytest.mark.parametrize("plain_barrier", [False, True])
def test_slow_eval_tasks_and_checkpoint_on_rank0_outlast_the_dist_timeout(data_dir, train_script, tmp_path,
                                                                          plain_barrier):
    run = tmp_path / "run"
    hooks = dict(SLOW_SAVE=10, SLOW_TASKS=10, **({"PLAIN_BARRIER": 1} if plain_barrier else {}))
    r = subprocess.run(torchrun(train_script, "train", *TEXT, "--data", str(data_dir), "--out", str(run),
                                "--max-steps", "3", "--eval-every", "2", "--checkpoint-every", "3",
                                "--eval-tasks", "fake", "--dist-timeout", "5", "--stall-timeout", "0"),
                       capture_output=True, text=True, timeout=300, env=env(**hooks))
    if plain_barrier:  # the same run with today's barrier is aborted by the collective timeout
        assert r.returncode != 0, r.stderr[-3000:]
        assert "Timed out waiting 5000ms" in r.stderr  # rank 1's barrier, while rank 0 worked
        assert not (run / "checkpoints" / "step_000003").exists()
    else:
        assert r.returncode == 0, r.stderr[-3000:]
        assert sorted(metrics_by_step(run, "tasks")) == [2, 3]
        assert sorted(metrics_by_step(run, "train")) == [1, 2, 3]
        assert (run / "checkpoints" / "step_000003").is_dir()


def _workers(launcher_pid: int) -> dict[int, int]:
    """rank -> pid of torchrun's worker processes."""
    out = {}
    for pid in subprocess.run(["pgrep", "-P", str(launcher_pid)], capture_output=True, text=True).stdout.split():
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        for kv in environ:
            if kv.startswith(b"RANK="):
                out[int(kv[5:])] = int(pid)
    return out


def _steps_logged(run: Path) -> int:
    m = run / "metrics.jsonl"
    return m.read_text().count('"kind": "train"') if m.exists() else 0


STALL_TIMEOUT = 6


@pytest.mark.slow
def test_sigstopped_rank_dumps_stacks_exits_and_the_same_command_continues_exactly(data_dir, train_script, tmp_path):
    """SIGSTOP rank 1 mid-run: rank 0's watchdog (not the longer collective timeout) writes its stacks
    and exits 3, torchrun ends the job; the same command again (as a requeue) continues from the
    latest checkpoint and its per-step losses equal an unbroken run's."""
    args = ["train", *TINY, "--data", str(data_dir), "--max-steps", "16", "--eval-every", "8",
            "--checkpoint-every", "4", "--dist-timeout", "120", "--stall-timeout", str(STALL_TIMEOUT),
            "--resume", "auto"]
    unbroken = tmp_path / "unbroken"
    r = subprocess.run(torchrun(train_script, *args, "--out", str(unbroken)), capture_output=True, text=True,
                       timeout=300, env=env())
    assert r.returncode == 0, r.stderr[-3000:]
    assert not (unbroken / "stalls").exists()

    run = tmp_path / "run"
    log = open(tmp_path / "stderr.txt", "w+")  # a file, not a pipe: a stopped worker must not hold our read
    p = subprocess.Popen(torchrun(train_script, *args, "--out", str(run)), stdout=subprocess.DEVNULL, stderr=log,
                         env=env(STEP_SLEEP=0.4))
    stopped = None
    try:
        deadline = time.time() + 150
        while time.time() < deadline and _steps_logged(run) < 6:
            time.sleep(0.05)
        assert _steps_logged(run) >= 6, "the run did not reach step 6"
        stopped = _workers(p.pid)[1]
        os.kill(stopped, signal.SIGSTOP)
        t0 = time.time()
        while time.time() - t0 < STALL_TIMEOUT + 30 and not list((run / "stalls").glob("rank0-*.txt")):
            time.sleep(0.1)
        waited = time.time() - t0
        dumps = list((run / "stalls").glob("rank0-*.txt"))
        assert dumps, "rank 0's watchdog wrote no stacks"
        assert STALL_TIMEOUT - 1 <= waited <= STALL_TIMEOUT + 30, waited
        text = dumps[0].read_text()
        # rank 0 waits in a collective: the step's all_reduce, or DDP's bucket all-reduce inside backward
        assert "no step finished" in text and ("all_reduce" in text or "backward" in text) \
            and "gptlab/train.py" in text, text
        p.wait(timeout=120)  # torchrun ends the stopped worker (SIGTERM, then SIGKILL after its shutdown timeout)
        ended = time.time() - t0
    finally:
        if stopped is not None:
            try:
                os.kill(stopped, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if p.poll() is None:
            p.kill()
            p.wait()
    log.seek(0)
    err = log.read()
    assert p.returncode != 0, err[-3000:]
    assert ended < STALL_TIMEOUT + 30 + 60, ended
    assert "rank 0: no step finished" in err and f"exiting with status {watchdog.EXIT_CODE}" in err
    assert "exitcode: 3" in err  # torchrun saw the watchdog's status
    assert not list((run / "stalls").glob("rank1-*.txt"))  # the stopped rank said nothing

    r = subprocess.run(torchrun(train_script, *args, "--out", str(run)), capture_output=True, text=True,
                       timeout=300, env=env())
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed from" in r.stderr
    a, b = metrics_by_step(unbroken, "train"), metrics_by_step(run, "train")
    assert sorted(a) == sorted(b) == list(range(1, 17))
    for s in a:
        assert b[s]["loss"] == pytest.approx(a[s]["loss"], rel=1e-6, abs=0), s
