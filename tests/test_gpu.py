"""The GPU suite: CUDA-only paths on gpt2-shaped micro runs. Skipped without CUDA (conftest);
run anywhere with `pytest -m gpu`. The same paths are proven on the CPU in test_precision.py."""

import json
import os

import pytest
import torch

from conftest import make_toy_data, metrics_by_step, run_gptlab
from gptlab.config import ModelConfig, TrainConfig, resolve_train_config
from gptlab.model import GPT, FusedHeadLoss
from gptlab.train import train
from test_hellaswag import some_items, write_jsonl

pytestmark = pytest.mark.gpu

# gpt2's head size (64) and vocabulary, two layers, a 256-token context
GPT2_MICRO = dict(model="gpt2", n_layer=2, seq_len=256, batch_size=4, total_batch_tokens=2048, lr=6e-4,
                  warmup_steps=2, eval_tokens=8192, sample_tokens=8, num_samples=1, device="cuda")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return make_toy_data(tmp_path_factory.mktemp("gdata"), 20_000, 200_000)


@pytest.fixture(scope="module")
def hs_file(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("ghs") / "hellaswag.jsonl", some_items(20, seed=5))


def _run_and_resume(run, data_dir, hs_file, **kw):
    cfg = resolve_train_config({**GPT2_MICRO, "data": str(data_dir), "out": str(run), "max_steps": 4,
                                "eval_every": 2, "checkpoint_every": 2, "hellaswag": True,
                                "hellaswag_file": str(hs_file), **kw})
    assert train(cfg).steps == 4
    assert sorted(metrics_by_step(run, "hellaswag")) == [2, 4] and sorted(metrics_by_step(run, "val")) == [2, 4]
    assert "=== step 4 ===" in (run / "samples.txt").read_text()
    assert train(TrainConfig(out=str(run)), resume=True, resume_flags={"max_steps": 6}).steps == 6
    tr = metrics_by_step(run, "train")
    assert sorted(tr) == list(range(1, 7)) and all(0 < r["loss"] < 12 for r in tr.values())
    return tr


def test_bf16_compiled_run_end_to_end(data_dir, hs_file, tmp_path):
    tr = _run_and_resume(tmp_path / "run", data_dir, hs_file, dtype="bf16", compile=True)
    assert all(r["mfu"] is None or r["mfu"] > 0 for r in tr.values())


def test_sdpa_flash_attention_runs_the_model():
    from torch.nn.attention import SDPBackend, sdpa_kernel

    model = GPT(ModelConfig(n_layer=2, n_head=12, n_embd=768, seq_len=256)).cuda()
    x = torch.randint(0, 50257, (2, 256), device="cuda")
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]), torch.autocast("cuda", dtype=torch.bfloat16):
        _, loss = model(x, x, return_logits=False)
        loss.backward()
    assert torch.isfinite(loss)


def test_fp16_with_grad_scaler_end_to_end(data_dir, hs_file, tmp_path):
    run = tmp_path / "run"
    _run_and_resume(run, data_dir, hs_file, dtype="fp16", compile=False)
    state = json.loads((run / "checkpoints" / "step_000006" / "state.json").read_text())
    assert state["grad_scaler"]["scale"] > 0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_fused_head_on_cuda_within_2_percent(dtype):
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(65536, 64, device="cuda", generator=g)
    w = torch.randn(256, 64, device="cuda", generator=g) * 0.02
    t = torch.randint(0, 256, (65536,), device="cuda", generator=g)

    def grads(dt, scale):
        xx, ww = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
        with torch.autocast("cuda", dtype=dt, enabled=dt != torch.float32):
            loss = FusedHeadLoss.apply(xx, ww, t, 256, -100)
        (loss * scale).backward()
        return xx.grad / scale, ww.grad / scale

    ref = grads(torch.float32, 1.0)
    got = grads(dtype, 2.0 ** 16)
    for a, b in zip(got, ref):
        assert float((a - b).norm() / b.norm()) < 0.02


def test_fused_adamw_resume_from_cpu(data_dir, tmp_path):
    """A run saved on the CPU (foreach AdamW, `step` on the CPU) resumes on CUDA with the fused one."""
    run = tmp_path / "run"
    base = {**GPT2_MICRO, "data": str(data_dir), "out": str(run), "max_steps": 2, "eval_every": 0,
            "sample_tokens": 0, "checkpoint_every": 2, "device": "cpu", "dtype": "fp32", "n_layer": 1,
            "seq_len": 64, "total_batch_tokens": 256}
    train(resolve_train_config(base))
    res = train(TrainConfig(out=str(run)), resume=True, resume_flags={"max_steps": 4, "device": "cuda"})
    assert res.steps == 4 and all(0 < r["loss"] < 12 for r in metrics_by_step(run, "train").values())


def test_fsdp_on_one_gpu():
    """FSDP2 with bf16 parameters on a one-process group: the training step and the gathered state."""
    import torch.distributed as tdist

    from gptlab.parallel import Placed, gather_state, shard_model
    from gptlab.train import train_step
    from gptlab.runtime import get_runtime

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29533")
    tdist.init_process_group("nccl", rank=0, world_size=1)
    try:
        rt = get_runtime("cuda", "bf16", False)
        model = GPT(ModelConfig(n_layer=2, n_head=12, n_embd=768, seq_len=256)).cuda()
        shard_model(model, rt)
        placed = Placed(model=model, forward=model, fsdp=True)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
        x = torch.randint(0, 50257, (4, 256), device="cuda")
        losses = [train_step(placed, rt, [(x, x)], 1, opt, grad_clip=1.0).loss for _ in range(3)]
        assert losses[-1] < losses[0]
        weights, opt_state = gather_state(placed, opt)
        assert weights["transformer.wte.weight"].shape == (50304, 768)
    finally:
        tdist.destroy_process_group()


def test_batch_size_auto_on_cuda(data_dir, tmp_path):
    run = tmp_path / "run"
    r = run_gptlab("train", "--model", "gpt2", "--n-layer", "2", "--seq-len", "256", "--data", data_dir, "--out", run,
                   "--batch-size", "auto", "--total-batch-tokens", "16384", "--max-steps", "2", "--eval-every", "2",
                   "--sample-tokens", "0", "--dtype", "bf16", "--compile")
    assert r.returncode == 0, r.stderr
    assert "--batch-size auto chose" in r.stderr


def test_bench_gpt2_reports_mfu():
    r = run_gptlab("bench", "--model", "gpt2", "--dtype", "bf16", "--compile", "--batch-size", "8",
                   "--steps", "10", "--json")
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout.strip().splitlines()[-1])
    name = torch.cuda.get_device_name()
    print(f"{name}: {res['tokens_per_s']:,.0f} tokens/s, MFU {res['mfu']}")
    assert res["tokens_per_s"] > 0 and res["peak_memory_bytes"] > 0
    from gptlab.runtime import gpu_model

    if gpu_model(name) is not None:
        assert 0 < res["mfu"] < 1
