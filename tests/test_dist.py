"""Distribution changes nothing but speed: 1 rank = 2 ranks = --nproc 2 = 2 nodes, on CPU/gloo."""

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import make_toy_data, metrics_by_step, run_gptlab


pytestmark = pytest.mark.slow

COMMON = ["--model", "tiny", "--n-layer", "1", "--n-head", "2", "--n-embd", "32", "--seq-len", "32", "--vocab-size", "320",
          "--total-batch-tokens", "512", "--lr", "3e-3", "--warmup-steps", "2", "--eval-every", "5",
          "--eval-tokens", "2048", "--sample-tokens", "4", "--checkpoint-every", "5", "--device", "cpu",
          "--dist-timeout", "60"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return make_toy_data(tmp_path_factory.mktemp("ddata"), 20_000, 100_000)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


ONE_THREAD = {"OMP_NUM_THREADS": "1"}


def env():
    e = dict(os.environ)
    e["OMP_NUM_THREADS"] = "1"
    return e


def torchrun(nproc, *args, extra=(), timeout=300):
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", *extra,
           "-m", "gptlab", *args]
    if not extra:
        cmd[3:3] = ["--standalone"]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env())


def assert_same_curve(a: Path, b: Path, rel=1e-4):
    la, lb = metrics_by_step(a, "train"), metrics_by_step(b, "train")
    assert sorted(la) == sorted(lb)
    for s in la:
        assert lb[s]["loss"] == pytest.approx(la[s]["loss"], rel=rel), s
    va, vb = metrics_by_step(a, "val"), metrics_by_step(b, "val")
    assert sorted(va) == sorted(vb) and va
    for s in va:
        assert vb[s]["loss"] == pytest.approx(va[s]["loss"], rel=rel), s


@pytest.fixture(scope="module")
def one_rank(data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("r1") / "run"
    r = run_gptlab("train", *COMMON, "--data", str(data_dir), "--out", str(out), "--batch-size", "4", "--max-steps", "10",
                   env=ONE_THREAD)
    assert r.returncode == 0, r.stderr
    return out


def test_two_ranks_equal_one(data_dir, one_rank, tmp_path):
    # 1 rank x accumulation 4 == 2 ranks x accumulation 2
    r = torchrun(2, "train", *COMMON, "--data", str(data_dir), "--out", str(tmp_path / "run"),
                 "--batch-size", "4", "--max-steps", "10")
    assert r.returncode == 0, r.stderr
    assert_same_curve(one_rank, tmp_path / "run")
    assert "2 rank(s)" in r.stderr


def test_self_launch_nproc(data_dir, one_rank, tmp_path):
    r = run_gptlab("train", *COMMON, "--data", str(data_dir), "--out", str(tmp_path / "run"), "--batch-size", "8",
               "--max-steps", "10", "--nproc", "2", env=ONE_THREAD)
    assert r.returncode == 0, r.stderr
    assert_same_curve(one_rank, tmp_path / "run")


def test_two_nodes_on_loopback(data_dir, one_rank, tmp_path):
    port = str(free_port())
    procs = []
    for node in (0, 1):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--node_rank={node}",
               "--nproc_per_node=1", "--master_addr=127.0.0.1", f"--master_port={port}",
               "-m", "gptlab", "train", *COMMON, "--data", str(data_dir), "--out", str(tmp_path / "run"),
               "--batch-size", "2", "--max-steps", "10"]
        procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env()))
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    assert_same_curve(one_rank, tmp_path / "run")


def rewind_to_step_5(run: Path) -> None:
    """Make step 5 the latest checkpoint, as if the run had been stopped there."""
    import shutil

    shutil.rmtree(run / "checkpoints" / "step_000010")
    (run / "checkpoints" / "latest").write_text("step_000005\n")


def test_elastic_resume_two_ranks_to_one(data_dir, one_rank, tmp_path):
    run = tmp_path / "run"
    r = torchrun(2, "train", *COMMON, "--data", str(data_dir), "--out", str(run), "--batch-size", "4",
                 "--max-steps", "10")
    assert r.returncode == 0, r.stderr
    rewind_to_step_5(run)
    r = run_gptlab("train", "--out", str(run), "--resume", env=ONE_THREAD)
    assert r.returncode == 0, r.stderr
    assert_same_curve(one_rank, run)


def test_fsdp_equals_ddp_and_switches_on_resume(data_dir, one_rank, tmp_path):
    run = tmp_path / "run"
    r = torchrun(2, "train", *COMMON, "--data", str(data_dir), "--out", str(run), "--batch-size", "4",
                 "--max-steps", "10", "--fsdp")
    assert r.returncode == 0, r.stderr
    assert_same_curve(one_rank, run)
    # the FSDP checkpoint is sharded (DCP): DDP resumes it, resharded
    rewind_to_step_5(run)
    r = torchrun(2, "train", "--out", str(run), "--resume", "--no-fsdp")
    assert r.returncode == 0, r.stderr
    assert_same_curve(one_rank, run)


def test_killed_rank_ends_the_job(data_dir, tmp_path):
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "gptlab", "train", *COMMON, "--data", str(data_dir), "--out", str(run), "--batch-size", "4",
           "--max-steps", "100000", "--dist-timeout", "20"]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env())
    deadline = time.time() + 120
    while time.time() < deadline and not ((run / "metrics.jsonl").exists()
                                           and (run / "metrics.jsonl").read_text().count("\n") >= 3):
        time.sleep(0.05)
    # kill one worker (not torchrun itself)
    children = subprocess.run(["pgrep", "-P", str(p.pid)], capture_output=True, text=True).stdout.split()
    assert children, "no worker processes found"
    os.kill(int(children[-1]), signal.SIGKILL)
    t0 = time.time()
    p.communicate(timeout=180)
    assert p.returncode != 0
    assert time.time() - t0 < 120
