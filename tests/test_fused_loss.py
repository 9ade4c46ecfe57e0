"""The fused, chunked output-layer loss equals lm_head + cross_entropy, in value and gradients."""

import pytest
import torch

from gptlab.config import ModelConfig
from gptlab.model import GPT, FusedHeadLoss


@pytest.mark.parametrize("chunk", [1 << 22, 3 * 64])  # one chunk, and many uneven chunks
def test_fused_equals_reference(chunk, monkeypatch):
    monkeypatch.setattr(FusedHeadLoss, "CHUNK_ELEMENTS", chunk)
    torch.manual_seed(0)
    model = GPT(ModelConfig(n_layer=2, n_head=2, n_embd=32, seq_len=16, vocab_size=100))
    x = torch.randint(0, 100, (3, 16))
    y = torch.randint(0, 100, (3, 16))
    y[0, :4] = -100  # ignored positions
    _, ref = model(x, y)
    ref.backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    logits, fused = model(x, y, return_logits=False)
    assert logits is None
    fused.backward()
    assert fused.item() == pytest.approx(ref.item(), rel=1e-6)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref_grads[n], rtol=1e-5, atol=1e-7, msg=n)


def test_fused_never_used_without_grad():
    model = GPT(ModelConfig(n_layer=1, n_head=1, n_embd=8, seq_len=8, vocab_size=50))
    x = torch.randint(0, 50, (1, 8))
    with torch.no_grad():
        logits, loss = model(x, x, return_logits=False)
    assert logits is not None and loss is not None


# ----------------------------------------------------------------------------- precision (issue 11, a and f)
# 65,536 predicted tokens over a 256-token vocabulary: each logit's gradient, (softmax - onehot) / n,
# is as small as gpt2's (50,304 logits) at about 330 tokens. Cast to fp16 before the loss scale
# is applied, it underflows; the fix keeps it unnormalised until backward, in fp32.
N_BIG, V_SMALL = 65536, 256


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def _head_grads(x, w, t, dtype, scale):
    x = x.clone().requires_grad_(True)
    w = w.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
        loss = FusedHeadLoss.apply(x, w, t, w.size(0), -100)
    (loss * scale).backward()
    return loss.detach(), x.grad / scale, w.grad / scale


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_fused_head_half_precision_with_loss_scale(dtype):
    """The output layer's gradients under autocast with GradScaler's initial scale (2^16) are
    within 2% of fp32's at a large micro-batch."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N_BIG, 32, generator=g)
    w = torch.randn(V_SMALL, 32, generator=g) * 0.02
    t = torch.randint(0, V_SMALL, (N_BIG,), generator=g)
    ref_loss, ref_gx, ref_gw = _head_grads(x, w, t, torch.float32, 1.0)
    loss, gx, gw = _head_grads(x, w, t, dtype, 2.0 ** 16)
    assert abs(loss.item() - ref_loss.item()) / ref_loss.item() < 1e-3
    assert _rel_err(gx, ref_gx) < 0.02, _rel_err(gx, ref_gx)
    assert _rel_err(gw, ref_gw) < 0.02, _rel_err(gw, ref_gw)


@pytest.mark.slow
def test_fp16_model_gradients_with_grad_scaler():
    """The whole model (2 layers, width 32) under fp16 autocast with torch.amp.GradScaler('cpu'):
    every parameter's gradient is within 2% of fp32's, biases and the final LayerNorm included."""
    torch.manual_seed(0)
    model = GPT(ModelConfig(n_layer=2, n_head=4, n_embd=32, seq_len=64, vocab_size=V_SMALL))
    x = torch.randint(0, V_SMALL, (N_BIG // 64, 64))
    y = torch.randint(0, V_SMALL, (N_BIG // 64, 64))
    _, loss = model(x, y, return_logits=False)
    loss.backward()
    ref = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    scaler = torch.amp.GradScaler("cpu")
    with torch.autocast("cpu", dtype=torch.float16):
        _, loss16 = model(x, y, return_logits=False)
    scaler.scale(loss16).backward()
    scaler.unscale_(opt)
    errs = {n: _rel_err(p.grad, ref[n]) for n, p in model.named_parameters()}
    worst = max(errs, key=errs.get)
    assert errs[worst] < 0.02, (worst, errs[worst])


def test_chunk_rows_sized_for_the_device():
    cpu = FusedHeadLoss.chunk_rows(torch.device("cpu"), 50304, 16384)
    assert cpu == (1 << 25) // 50304  # 667 rows: 128 MiB of fp32 logits at most
    assert FusedHeadLoss.chunk_rows(torch.device("cpu"), 50304, 512) == 512  # gpt2 at B=4, T=128: one chunk
    # CUDA with plenty of free memory: a few large chunks, not ~200 small ones
    rows = FusedHeadLoss.chunk_rows(torch.device("cuda"), 50304, 16384, free_bytes=60 << 30)
    assert rows % 64 == 0 and 16384 / rows <= 8
    # little free memory: smaller chunks, never fewer than 64 rows, never more than there are
    small = FusedHeadLoss.chunk_rows(torch.device("cuda"), 50304, 16384, free_bytes=1 << 30)
    assert 64 <= small < rows
    assert FusedHeadLoss.chunk_rows(torch.device("cuda"), 50304, 100, free_bytes=60 << 30) == 100


def test_chunk_rows_count_the_caching_allocators_free_blocks(monkeypatch):
    """After the first step the caching allocator holds most of the memory as reserved-but-unused
    blocks, which mem_get_info reports as used: they count as free for the chunk size. (Failed
    before: 256 MiB free by mem_get_info alone gave the 64-row minimum.)"""
    cuda = torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (256 << 20, 80 << 30))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 60 << 30)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 10 << 30)
    assert FusedHeadLoss.free_cuda_bytes(cuda) == (256 << 20) + (50 << 30)
    rows = FusedHeadLoss.chunk_rows(cuda, 50304, 16384)
    assert rows == FusedHeadLoss.chunk_rows(cuda, 50304, 16384, free_bytes=(256 << 20) + (50 << 30))
    assert rows > 64 and 16384 / rows <= 8  # a few large chunks, not hundreds of small ones
    alone = FusedHeadLoss.chunk_rows(cuda, 50304, 16384, free_bytes=256 << 20)
    assert alone == 64
