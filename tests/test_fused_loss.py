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
