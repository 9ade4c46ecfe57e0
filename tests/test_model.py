"""The GPT-2 network: shapes, causality, the padded vocabulary, initial loss, and the cache path."""

import math

import pytest
import torch

from gptlab.config import ModelConfig
from gptlab.generate import KVCache
from gptlab.model import GPT

CFG = dict(n_layer=2, n_head=4, n_embd=32, seq_len=32)


def test_logits_cover_only_the_real_vocabulary(make_gptlab):
    m = make_gptlab(**CFG)
    assert m.config.padded_vocab_size == 50304
    assert m.transformer.wte.weight.shape == (50304, 32)
    assert m.lm_head.weight is m.transformer.wte.weight  # tied
    logits, loss = m(torch.randint(0, 50257, (2, 7)))
    assert logits.shape == (2, 7, 50257) and loss is None
    assert torch.isfinite(logits).all()


def test_padded_rows_do_not_change_logits_or_loss(make_gptlab):
    m = make_gptlab(**CFG)
    x, y = torch.randint(0, 50257, (2, 9)), torch.randint(0, 50257, (2, 9))
    with torch.no_grad():
        before, loss_before = m(x, y)
        m.transformer.wte.weight[50257:] = 100.0  # huge logits if the padded ids were not masked
        after, loss_after = m(x, y)
    assert torch.equal(before, after)
    assert torch.allclose(loss_before, loss_after)


def test_parameter_count_matches_config(make_gptlab):
    for overrides in (CFG, dict(n_layer=3, n_head=2, n_embd=16, seq_len=8, vocab_multiple=128)):
        m = make_gptlab(**overrides)
        assert m.num_params() == m.config.num_params()


def test_gpt2_124m_parameter_count():
    # 124,439,808 with the 50257-row embedding (transformers' count); the padded table adds 47 * 768
    cfg = ModelConfig()
    assert cfg.num_params() == 124_439_808 + 47 * 768


def test_causal(make_gptlab):
    m = make_gptlab(**CFG)
    x = torch.randint(0, 50257, (1, 16))
    y = x.clone()
    y[0, 10] = (x[0, 10] + 1) % 50257
    with torch.no_grad():
        a, _ = m(x)
        b, _ = m(y)
    assert torch.allclose(a[:, :10], b[:, :10], atol=1e-6)  # earlier positions untouched
    assert not torch.allclose(a[:, 10:], b[:, 10:], atol=1e-3)  # the changed and later ones see it


def test_initial_loss_is_uniform():
    torch.manual_seed(0)
    m = GPT(ModelConfig(n_layer=2, n_head=4, n_embd=64, seq_len=64))  # the real init, no perturbation
    x = torch.randint(0, 50257, (4, 64))
    y = torch.randint(0, 50257, (4, 64))  # random targets, unrelated to the inputs
    with torch.no_grad():
        _, loss = m(x, y)
    assert abs(loss.item() - math.log(50257)) < 0.05


def test_ignore_index(make_gptlab):
    m = make_gptlab(**CFG)
    x, y = torch.randint(0, 50257, (1, 8)), torch.randint(0, 50257, (1, 8))
    y_masked = y.clone()
    y_masked[0, 4:] = -100
    with torch.no_grad():
        logits, loss = m(x, y_masked)
        ref = torch.nn.functional.cross_entropy(logits[0, :4], y[0, :4])
    assert torch.allclose(loss, ref, atol=1e-5)


def test_too_long_raises(make_gptlab):
    m = make_gptlab(**CFG)
    with pytest.raises(ValueError, match="longer than the context"):
        m(torch.zeros(1, 33, dtype=torch.long))


def test_every_cache_type_satisfies_the_one_protocol(make_gptlab):
    """model.Cache declares all the model reads (pos, positions, attn_mask, update); the three
    cache types provide it, and an object missing a declared member is not a Cache."""
    from gptlab.model import Cache
    from gptlab.scoring import PackedRows
    from gptlab.serve_engine import BatchCache

    m = make_gptlab(**CFG)
    caches = [KVCache.for_model(m, batch_size=2), BatchCache(m, 2),
              PackedRows(torch.arange(4).repeat(2, 1), torch.zeros(2, 4, dtype=torch.long))]
    for c in caches:
        assert isinstance(c, Cache), type(c).__name__
    kv = caches[0]
    assert kv.positions is None and kv.attn_mask is None  # the plain causal path
    del kv.attn_mask
    assert not isinstance(kv, Cache)


def test_cache_in_chunks_equals_full_forward(make_gptlab):
    """Prefill, then a multi-token chunk after cached ones (the masked path), then single tokens."""
    m = make_gptlab(**CFG)
    x = torch.randint(0, 50257, (3, 20))
    cache = KVCache.for_model(m, batch_size=3)
    with torch.no_grad():
        full, _ = m(x)
        parts = [m(x[:, a:b], cache=cache)[0] for a, b in ((0, 7), (7, 12), (12, 13), (13, 14), (14, 20))]
    assert cache.pos == 20
    assert torch.allclose(torch.cat(parts, dim=1), full, atol=1e-5)
