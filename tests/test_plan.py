"""The memory plan: its arithmetic, its CLI (`gptlab plan`, `gptlab train --dry-run`), and its figures
against the live tensor memory of a real CPU training step."""

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
                     gpu_memory=str(p.total() + GIB - 1))
    assert tight.fits() is False  # the CUDA reserve counts
    auto = plan_for(SMALL, world_size=1, fsdp=False, dtype="fp32", batch_size="auto", compiled=False,
                    gpu_memory=str(q.total() + GIB))
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
    plan = MemoryPlan(cfg, world_size=1, fsdp=False, dtype="fp32", batch_size=batch, compiled=False)
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
