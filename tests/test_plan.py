"""The memory plan: its arithmetic, its CLI (`gptlab plan`, `gptlab train --dry-run`), its figures
against the live tensor memory of real CPU training steps (one process, and 2 gloo ranks under DDP
and FSDP), and the time and cost it prints from a bench result or a stated MFU."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from gptlab.config import ModelConfig, TrainConfig
from gptlab.errors import UserError
from gptlab.model import GPT
from gptlab.optim import make_adamw
from gptlab.parallel import Placed
from gptlab.train import train_step
from gptlab.plan import GIB, MemoryPlan, parse_size, plan_for, plan_from_train_config
from gptlab.runtime import get_runtime

SMALL = ModelConfig(n_layer=2, n_head=2, n_embd=32, seq_len=32, vocab_size=500, vocab_multiple=64)


def test_parse_size():
    assert parse_size("80GB") == 80 * GIB == parse_size("80 GiB") == parse_size("80g")
    assert parse_size("512M") == 512 << 20
    assert parse_size("1.5G") == int(1.5 * GIB)
    for bad in ("lots", "", "-3G", "0G", "12 parsecs"):
        with pytest.raises(UserError):
            parse_size(bad)


def test_states_follow_adamw_and_sharding():
    n = SMALL.num_params()
    one = MemoryPlan(SMALL, world_size=4, fsdp=False, dtype="fp32", batch_size=2, compiled=False)
    assert (one.parameters(), one.gradients(), one.optimizer()) == (4 * n, 4 * n, 8 * n)
    sharded = MemoryPlan(SMALL, world_size=4, fsdp=True, dtype="fp32", batch_size=2, compiled=False)
    assert sharded.parameters() == 4 * n // 4 and sharded.optimizer() == 8 * n // 4
    # FSDP's working set: the unsharded embeddings (root) and two blocks, plus their gradients
    C, V, T = 32, 512, 32
    embed, block = (V + T) * C + 2 * C, 12 * C * C + 13 * C
    assert sharded.working() == (embed + 2 * block) * 4 + (embed + block) * 4
    assert one.working() == 0  # fp32 without FSDP: no copies
    bf16 = MemoryPlan(SMALL, world_size=1, fsdp=False, dtype="bf16", batch_size=2, compiled=False)
    assert bf16.working() == 2 * n  # autocast's bf16 weight copies


def test_activations_scale_with_the_batch_and_fit_check():
    p = plan_for(SMALL, world_size=1, fsdp=False, dtype="fp32", batch_size=4, compiled=False, gpu_memory="64G")
    q = plan_for(SMALL, world_size=1, fsdp=False, dtype="fp32", batch_size=8, compiled=False, gpu_memory="64G")
    # per sequence: the blocks' and the final norm's activations, and the fused head's chunk of fp32
    # logits (one chunk holds them all at this size)
    per_seq = SMALL.seq_len * SMALL.n_embd * (SMALL.n_layer * 68 + 8) + SMALL.seq_len * SMALL.padded_vocab_size * 4
    assert q.activations() - p.activations() == 4 * per_seq
    assert p.fits() is True
    tight = plan_for(SMALL, world_size=1, fsdp=False, dtype="fp32", batch_size=4, compiled=False,
                     gpu_memory=str(p.total() + p.reserve() - 1))
    assert tight.fits() is False  # the reserve counts
    auto = plan_for(SMALL, world_size=1, fsdp=False, dtype="fp32", batch_size="auto", compiled=False,
                    gpu_memory=str(q.needed()))
    assert auto.batch_size == 8 and auto.fits()
    with pytest.raises(UserError, match="needs --gpu-memory"):
        plan_for(SMALL, world_size=1, fsdp=False, dtype="fp32", batch_size="auto", compiled=False, gpu_memory=None)


def test_gpt2_xl_on_eight_80gb_gpus_needs_fsdp():
    """The issue's case: gpt2-xl weights and AdamW state (about 18 GB) per GPU without FSDP."""
    cfg = TrainConfig(model="gpt2-xl", batch_size=8, fsdp=False, gpu_memory="24GB")
    plain = plan_from_train_config(cfg, world_size=8)
    assert 17e9 < plain.parameters() + plain.gradients() + plain.optimizer() < 27e9
    assert not plain.fits()
    cfg.fsdp = True
    sharded = plan_from_train_config(cfg, world_size=8)
    assert sharded.optimizer() == plain.optimizer() // 8
    assert sharded.total() < plain.total()


def _live_peak(cfg: ModelConfig, batch: int, accum: int) -> int:
    """Peak of live tensor storage over two training steps (torch's MemTracker dispatch mode)."""
    from torch.distributed._tools.mem_tracker import MemTracker

    rt = get_runtime("cpu", "fp32", False)
    x = torch.randint(0, cfg.vocab_size, (batch, cfg.seq_len))
    mt = MemTracker()
    with mt:
        model = GPT(cfg)
        opt = make_adamw(model, lr=1e-4, weight_decay=0.1, betas=(0.9, 0.95), eps=1e-8, device_type="cpu")
        placed = Placed(model=model, forward=model)
        for _ in range(2):
            for micro in range(accum):
                train_step(placed, rt, [(x, x)], accum=1, optimizer=opt if micro == accum - 1 else None)
                mt.reset_mod_stats()
    (snap,) = [v for k, v in mt.get_tracker_snapshot("peak").items() if str(k) == "cpu"]
    return int(snap["Total"])


@pytest.mark.parametrize("cfg,batch", [
    (ModelConfig(n_layer=2, n_head=2, n_embd=64, seq_len=64), 4),
    pytest.param(ModelConfig(n_layer=4, n_head=4, n_embd=128, seq_len=128), 8, marks=pytest.mark.slow),
])
def test_plan_matches_measured_peak(cfg, batch):
    """With accumulation the gradients live through the next forward, so the plan's sum is the peak."""
    plan = MemoryPlan(cfg, world_size=1, fsdp=False, dtype="fp32", batch_size=batch, compiled=False, accum=2)
    measured = _live_peak(cfg, batch, accum=2)
    assert plan.total() == pytest.approx(measured, rel=0.05)


def test_plan_cli_and_dry_run(cli, tmp_path):
    r = cli("plan", "--model", "gpt2-xl", "--fsdp", "--nproc", "8", "--batch-size", "8",
            "--gpu-memory", "80GB")
    assert r.returncode == 0, r.stderr
    for word in ("parameters", "gradients", "optimizer", "activations", "total", "8 rank(s)", "FSDP on", "fits in"):
        assert word in r.stdout, word
    r = cli("train", "--model", "tiny", "--out", tmp_path / "run", "--dry-run", "--device", "cpu",
            "--gpu-memory", "1M")
    assert r.returncode == 0, r.stderr
    assert "does NOT fit" in r.stdout and "fp32" in r.stdout
    assert not (tmp_path / "run").exists()  # a dry run trains nothing and writes nothing
    r = cli("plan", "--model", "gpt2", "--gpu-memory", "lots")
    assert r.returncode == 2 and "gpu-memory" in r.stderr and "Traceback" not in r.stderr


# ----------------------------------------------------------------------------- distributed memory

def _plan_memory():
    """benchmarks/plan_memory.py, whose child measures a row: the test and the benchmark measure alike."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "plan_memory.py"
    spec = importlib.util.spec_from_file_location("plan_memory", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


MICRO = (2, 2, 64, 64, 4)  # n_layer, n_head, n_embd, seq_len, micro-batch


@pytest.mark.slow
def test_ddp_accumulation_holds_one_copy_of_the_gradients():
    """DDP with gradient_as_bucket_view, and its gradients zeroed in place, made before DDP is built:
    2 ranks accumulating hold what one process holds. Failed before (gradient buckets beside
    separate gradients: 127.0 MiB against 114.3 MiB)."""
    pm = _plan_memory()
    one, ddp = pm.run_row("one", MICRO, 2), pm.run_row("ddp", MICRO, 2)
    assert ddp["peak"] == pytest.approx(one["peak"], rel=0.01)
    assert ddp["plan"] == pytest.approx(ddp["peak"], rel=0.10)


@pytest.mark.parametrize("accum", [pytest.param(1, marks=pytest.mark.slow), 2])
def test_fsdp_plan_matches_measured_peak(accum):
    """FSDP on 2 gloo ranks: the plan counts the unsharded root and, with accumulation, the unsharded
    fp32 gradients FSDP2 holds between micro-batches."""
    r = _plan_memory().run_row("fsdp", MICRO, accum)
    assert r["plan"] == pytest.approx(r["peak"], rel=0.10)
    if accum > 1:
        assert r["by_kind"]["Gradient"] >= 4 * ModelConfig(n_layer=2, n_head=2, n_embd=64, seq_len=64).num_params()


def test_distributed_terms():
    cfg = ModelConfig(n_layer=2, n_head=2, n_embd=64, seq_len=64)
    n = cfg.num_params()
    fsdp = MemoryPlan(cfg, world_size=2, fsdp=True, dtype="bf16", batch_size=4, compiled=True, accum=4)
    assert fsdp.unsharded_gradients() == 4 * n and fsdp.working_grads() == 0
    assert MemoryPlan(cfg, world_size=2, fsdp=True, dtype="bf16", batch_size=4, compiled=True).unsharded_gradients() == 0
    ddp = MemoryPlan(cfg, world_size=2, fsdp=False, dtype="fp32", batch_size=4, compiled=False)
    assert ddp.gradients_in_forward() == 4 * n  # the buckets stay allocated
    one = MemoryPlan(cfg, world_size=1, fsdp=False, dtype="fp32", batch_size=4, compiled=False)
    assert one.gradients_in_forward() == 0 and ddp.transient() >= 4 * n
    assert one.reserve_parts()["nccl"] == 0 < ddp.reserve_parts()["nccl"]
    assert ddp.needed() == ddp.total() + ddp.reserve()


def test_gpt2_large_on_eight_80gb_gpus_at_b32_no_longer_fits():
    """The issue's case: 75.9 GiB of tensors, and 1 GiB was all the old plan kept back."""
    cfg = TrainConfig(model="gpt2-large", batch_size=32, gpu_memory="80GB")
    plan = plan_from_train_config(cfg, world_size=8)
    assert 75 * GIB < plan.total() < 77 * GIB
    assert plan.reserve() > 5 * GIB and not plan.fits() and plan.largest_batch() == 16


# ----------------------------------------------------------------------------- time and cost

def _bench_file(tmp_path, **over) -> Path:
    res = {"model": "gpt2", "params": 124475904, "device": "cuda (NVIDIA H100 80GB HBM3)", "dtype": "bf16",
           "compiled": True, "fsdp": False, "ranks": 1, "batch_size": 16, "seq_len": 1024, "steps": 20,
           "step_time_s": 0.1, "tokens_per_s": 400_000.0, "flops_per_token": 7.6e8, "peak_flops": 9.89e14,
           "mfu": 0.31, "peak_memory_bytes": 1, "peak_memory_kind": "cuda", "last_loss": 10.9, **over}
    path = tmp_path / "bench.json"
    path.write_text(json.dumps(res))
    return path


def test_time_from_bench_scales_per_rank(cli, tmp_path):
    bench = _bench_file(tmp_path)
    r = cli("plan", "--model", "gpt2", "--nproc", "8", "--batch-size", "16", "--bench", bench,
            "--gpu-hour-price", "2", "--max-steps", "1000", "--json")
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("\n") == 1
    t = json.loads(r.stdout)["time"]
    assert t["tokens_per_s"] == pytest.approx(8 * 400_000)
    assert t["tokens"] == 1000 * 524288
    assert t["seconds"] == pytest.approx(1000 * 524288 / 3.2e6)
    assert t["gpu_hours"] == pytest.approx(t["seconds"] / 3600 * 8)
    assert t["cost"] == pytest.approx(2 * t["gpu_hours"]) and t["notes"] == []
    r = cli("plan", "--model", "gpt2", "--bench", bench, "--batch-size", "32")
    assert r.returncode == 0 and "tokens/s" in r.stdout and "GPU-hours" in r.stdout
    assert "the bench ran B=16" in r.stdout  # a different micro-batch is said, not hidden


def test_time_from_peak_and_stated_mfu(cli):
    r = cli("plan", "--model", "gpt2", "--nproc", "8", "--batch-size", "64", "--gpu", "H100", "--mfu", "0.4",
            "--gpu-hour-price", "2.5", "--json")
    assert r.returncode == 0, r.stderr
    t = json.loads(r.stdout)["time"]
    flops = ModelConfig().flops_per_token(1024)
    assert t["tokens_per_s"] == pytest.approx(0.4 * 989e12 * 8 / flops)
    assert "MFU 40%" in t["source"] and "H100" in t["source"]
    r = cli("plan", "--model", "gpt2", "--peak-tflops", "100", "--mfu", "0.5")
    assert r.returncode == 0 and "to finish" in r.stdout and "cost" not in r.stdout
    assert cli("plan", "--model", "gpt2").stdout.count("time (") == 0  # no throughput, no time


@pytest.mark.parametrize("args,message", [
    (["--bench", "MISSING"], "no such file"),
    (["--bench", "GARBLED"], "not valid JSON"),
    (["--bench", "FOREIGN"], "not a `gptlab bench --json` result"),
    (["--bench", "OTHER_MODEL"], "measured gpt2-xl"),
    (["--gpu", "H100", "--mfu", "0.4", "--gpu-hour-price", "-1"], "--gpu-hour-price"),
    (["--gpu-hour-price", "2"], "need a throughput"),
    (["--mfu", "0.4"], "needs the device's peak"),
    (["--gpu", "Voodoo5", "--mfu", "0.4"], "not a GPU gptlab knows"),
    (["--gpu", "H100", "--mfu", "1.5"], "--mfu"),
])
def test_bad_time_input_is_one_line_and_exit_2(cli, tmp_path, args, message):
    files = {"MISSING": tmp_path / "nope.json", "GARBLED": tmp_path / "garbled.json",
             "FOREIGN": tmp_path / "foreign.json", "OTHER_MODEL": _bench_file(tmp_path, model="gpt2-xl", params=1_557_611_200)}
    files["GARBLED"].write_text('{"tokens_per_s": 12')
    files["FOREIGN"].write_text('{"tokens_per_s": 12}')
    args = [str(files.get(a, a)) for a in args]
    for json_flag in ([], ["--json"]):
        r = cli("plan", "--model", "gpt2", *args, *json_flag)
        assert r.returncode == 2, r.stdout
        assert message in r.stderr and r.stderr.count("\n") == 1 and r.stdout == ""


def test_plan_flags_need_the_plan(cli, tmp_path):
    r = cli("train", "--model", "tiny", "--out", tmp_path / "run", "--gpu-hour-price", "2")
    assert r.returncode == 2 and "goes with the plan" in r.stderr and not (tmp_path / "run").exists()
    r = cli("train", "--model", "tiny", "--out", tmp_path / "run", "--dry-run", "--device", "cpu", "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["memory"]["dtype"] == "fp32"


def test_plan_json_is_one_document_at_the_descriptor(tmp_path):
    """--json through a real process: stdout holds one JSON line and nothing else."""
    from conftest import run_gptlab

    r = run_gptlab("plan", "--model", "gpt2", "--gpu", "A100", "--mfu", "0.5", "--gpu-hour-price", "1.5", "--json")
    assert r.returncode == 0, r.stderr
    assert r.stdout.endswith("\n") and r.stdout.count("\n") == 1
    doc = json.loads(r.stdout)
    assert doc["memory"]["bytes"]["reserve"]["nccl"] == 0 and doc["time"]["cost"] > 0
