"""muon.py: Muon's Newton-Schulz work shared over ranks. 2 gloo ranks (replicated parameters as
under DDP, and FSDP2's row shards) step exactly as one process does, each rank orthogonalising
half of the matrices (shapes whose rows or count do not divide by the ranks included); training
with Muon on 2 ranks, DDP or --fsdp, equals 1 process and resumes exactly."""

import datetime
import shutil
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as tdist
import torch.multiprocessing as mp

from conftest import make_toy_data, run_gptlab
from gptlab import checkpoint as ck
from gptlab.muon import Muon, newton_schulz
from test_fsdp import ONE_THREAD, assert_same_curve, losses, rewind, torchrun

# (rows, cols): three of one shape (not a multiple of 2 ranks), rows that 2 ranks do not split evenly,
# and a single row (rank 1 holds none of it under FSDP)
SHAPES = [(6, 4), (6, 4), (6, 4), (5, 3), (3, 7), (1, 5), (8, 8), (8, 8)]
STEPS = 3
KW = dict(lr=0.02, momentum=0.95, nesterov=True, weight_decay=0.01, adjust_lr_fn="original", ns_fp32=True)


class Mats(torch.nn.Module):
    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.ws = torch.nn.ParameterList(torch.nn.Parameter(torch.randn(s, generator=g)) for s in SHAPES)


def grads(step: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    return [torch.randn(s, generator=g) * torch.logspace(0, -2, s[1]) for s in SHAPES]


def reference() -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(weights, momentum buffers) after STEPS steps in one process."""
    model = Mats()
    opt = Muon(model.ws, **KW)
    for step in range(STEPS):
        for p, g in zip(model.ws, grads(step)):
            p.grad = g
        opt.step()
    return [p.detach() for p in model.ws], [opt.state[p]["momentum_buffer"] for p in model.ws]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, n: int, port: int, mode: str, out: str) -> None:
    torch.set_num_threads(1)
    tdist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=n,
                             timeout=datetime.timedelta(seconds=60))
    try:
        model = Mats()
        if mode == "fsdp":
            from torch.distributed.fsdp import fully_shard
            from torch.distributed.tensor import Shard, distribute_tensor

            fully_shard(model)
        opt = Muon(model.ws, shared=mode == "ddp", **KW)
        counts = []
        for step in range(STEPS):
            for p, g in zip(model.ws, grads(step)):
                p.grad = distribute_tensor(g, p.device_mesh, [Shard(0)]) if mode == "fsdp" else g
            opt.step()
            counts.append(opt.ns_matrices)
        full = lambda t: t.full_tensor() if hasattr(t, "full_tensor") else t  # noqa: E731
        torch.save({"weights": [full(p.detach()) for p in model.ws],
                    "bufs": [full(opt.state[p]["momentum_buffer"]) for p in model.ws],
                    "counts": counts, "dtensor": hasattr(model.ws[0], "to_local")}, f"{out}/rank{rank}.pt")
    finally:
        tdist.destroy_process_group()


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_ranks_share_the_work_and_equal_one(mode, tmp_path):
    mp.spawn(_worker, args=(2, _free_port(), mode, str(tmp_path)), nprocs=2)
    want_w, want_b = reference()
    results = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    for res in results:
        assert res["dtensor"] == (mode == "fsdp")
        for s, a, b in zip(SHAPES, res["weights"], want_w):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=str(s))
        for s, a, b in zip(SHAPES, res["bufs"], want_b):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=str(s))
    # by shape: (6,4) x3 -> 2 + 1, (5,3), (3,7), (1,5) -> 1 + 0 each, (8,8) x2 -> 1 + 1
    assert [r["counts"] for r in results] == [[6] * STEPS, [2] * STEPS]


def test_single_process_steps_like_torch():
    """Without ranks, gptlab's Muon is torch.optim.Muon's update (in bf16, torch's precision) and
    keeps torch's state dict."""
    torch.manual_seed(0)
    w0 = torch.randn(48, 16)
    kw = {k: v for k, v in KW.items() if k != "ns_fp32"}
    ps = [torch.nn.Parameter(w0.clone()) for _ in range(2)]
    ours, theirs = Muon([ps[0]], **kw), torch.optim.Muon([ps[1]], **kw)
    for step in range(3):
        g = torch.randn(48, 16)
        for p, opt in zip(ps, (ours, theirs)):
            p.grad = g.clone()
            opt.step()
    assert torch.equal(ps[0], ps[1])
    assert ours.state_dict()["state"][0].keys() == theirs.state_dict()["state"][0].keys() == {"momentum_buffer"}
    assert ours.ns_matrices == 1


def test_newton_schulz_orthogonalises_in_either_dtype():
    g = torch.randn(64, 16) * torch.logspace(0, -2, 16)
    for dtype in (torch.float32, torch.bfloat16):
        x = newton_schulz(g, (3.4445, -4.7750, 2.0315), 5, 1e-7, dtype)
        assert x.dtype == dtype and x.shape == g.shape
        sv = torch.linalg.svdvals(x.float())[:12]
        assert sv.min() > 0.5 and sv.max() < 1.3, sv


# ----------------------------------------------------------------------------- training runs, 2 ranks under torchrun

MICRO = ["--model", "tiny", "--n-layer", "2", "--n-head", "2", "--n-embd", "32", "--seq-len", "32",
         "--vocab-size", "320", "--total-batch-tokens", "512", "--batch-size", "4", "--lr", "3e-3",
         "--warmup-steps", "2", "--eval-every", "4", "--eval-tokens", "2048", "--sample-tokens", "0",
         "--checkpoint-every", "4", "--keep-checkpoints", "0", "--device", "cpu", "--dist-timeout", "60",
         "--optimizer", "muon", "--max-steps", "8"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return make_toy_data(tmp_path_factory.mktemp("mudata"), 20_000, 100_000)


@pytest.fixture(scope="module")
def one_rank(data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("mu1") / "run"
    r = run_gptlab("train", *MICRO, "--data", data_dir, "--out", out, env=ONE_THREAD)
    assert r.returncode == 0, r.stderr
    return out


def assert_identical(a: Path, b: Path) -> None:
    for kind in ("train", "val"):
        assert losses(a, kind) == losses(b, kind), kind


def two_rank_run(data_dir, out: Path, *flags: str) -> Path:
    """A whole 2-rank MICRO run into `out`."""
    r = torchrun(2, "train", *MICRO, *flags, "--data", data_dir, "--out", out)
    assert r.returncode == 0, r.stderr
    assert "2 rank(s)" in r.stderr
    return out


@pytest.fixture(scope="module")
def two_fsdp_ranks(data_dir, tmp_path_factory) -> Path:
    """A whole 2-rank --fsdp run, shared (read-only: a test that changes it copies it first)."""
    return two_rank_run(data_dir, tmp_path_factory.mktemp("muon_fsdp") / "full", "--fsdp")


@pytest.mark.slow
@pytest.mark.parametrize("fsdp", [False, True], ids=["ddp", "fsdp"])
def test_two_ranks_equal_one_and_resume_exactly(data_dir, one_rank, tmp_path, fsdp, request):
    """2 ranks (DDP, or FSDP's sharded matrices) train as 1 process does; stopped at step 4 and
    resumed from its checkpoint (single-file, or DCP shards holding Muon's momentum), the run
    gives the unbroken run's losses."""
    part = tmp_path / "part"
    full = request.getfixturevalue("two_fsdp_ranks") if fsdp else two_rank_run(data_dir, tmp_path / "full")
    assert_same_curve(one_rank, full, rel=1e-4)
    ckpt = full / "checkpoints" / "step_000004"
    assert ck.is_sharded_checkpoint(ckpt) == fsdp
    if fsdp:
        keys = ck.safe_reader(ckpt).read_metadata().state_dict_metadata
        assert sum(k.endswith("/momentum_buffer") for k in keys) == 8  # 2 blocks x 4 matrices
    shutil.copytree(full, part)
    rewind(part, 4)
    r = torchrun(2, "train", "--out", part, "--resume")
    assert r.returncode == 0, r.stderr
    assert f"resumed from {part / 'checkpoints' / 'step_000004'}" in r.stderr
    assert_identical(full, part)


@pytest.mark.slow
def test_fsdp_muon_checkpoint_resumes_on_one_process(two_fsdp_ranks, one_rank, tmp_path):
    """Muon's sharded momentum in a DCP checkpoint reshards: a 2-rank --fsdp run stopped at step 4
    continues on 1 process (--no-fsdp) along the 1-process run's curve."""
    run = tmp_path / "run"
    shutil.copytree(two_fsdp_ranks, run)
    rewind(run, 4)
    r = run_gptlab("train", "--out", run, "--resume", "--no-fsdp", env=ONE_THREAD)
    assert r.returncode == 0, r.stderr
    assert "1 rank(s)" in r.stderr
    assert_same_curve(one_rank, run, rel=1e-4)
    assert (run / "checkpoints" / "step_000008" / "optimizer.pt").is_file()  # back to the single file


@pytest.mark.slow
def test_single_file_muon_checkpoint_resumes_under_fsdp(one_rank, tmp_path):
    """1 process -> 2 FSDP ranks: Muon's whole momentum buffers from optimizer.pt become row shards."""
    run = tmp_path / "run"
    shutil.copytree(one_rank, run)
    rewind(run, 4)
    r = torchrun(2, "train", "--out", run, "--resume", "--fsdp")
    assert r.returncode == 0, r.stderr
    assert_same_curve(one_rank, run, rel=1e-4)
    assert ck.is_sharded_checkpoint(run / "checkpoints" / "step_000008")
