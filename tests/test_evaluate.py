"""Validation loss and the eval report, checked against independent computations on hand-made
models and data (HellaSwag: test_hellaswag.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import write_shard
from gptlab import evaluate as ev
from gptlab.errors import UserError


# ----------------------------------------------------------------------------- report

def test_report_shows_references_of_the_matching_size():
    res = {"hellaswag": {"completion": {"acc": 0.25, "acc_norm": 0.26, "n": 100},
                         "harness": {"acc": 0.27, "acc_norm": 0.28, "n": 100}, "cropped": 0},
           "val": {"loss": 3.5, "perplexity": 33.1155, "tokens": 1000}}
    text = ev.format_report(res, preset="gpt2")
    assert "OpenAI GPT-2 124M" in text and "0.2955" in text and "0.3114" in text and "0.3370" in text
    assert "perplexity 33.12" in text
    xl = ev.format_report(res, preset="gpt2-xl")
    assert "0.4893" in xl and "0.5089" in xl and "0.5470" in xl
    assert "OpenAI" not in ev.format_report(res, preset=None)


# ----------------------------------------------------------------------------- validation loss

@pytest.fixture
def val_dir(tmp_path):
    rng = np.random.default_rng(0)
    d = tmp_path / "data"
    d.mkdir()
    write_shard(d / "test_val_000000.bin", rng.integers(0, 50257, 3000))
    write_shard(d / "test_train_000001.bin", rng.integers(0, 50257, 5000))
    return d


def test_val_loss_equals_a_direct_computation(make_gptlab, val_dir):
    from gptlab.data import loader

    model = make_gptlab(seed=8)
    model.train()
    res = ev.evaluate_val_loss(model, val_dir, device="cpu", seq_len=32, batch_size=4, max_tokens=1024)
    assert model.training
    total, n = 0.0, 0
    with torch.no_grad():
        for x, y in loader.iter_val_batches(val_dir, seq_len=32, batch_size=4, max_tokens=1024):
            logits, _ = model.eval()(x)
            total += F.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1), reduction="sum").item()
            n += y.numel()
    assert n > 0 and res["tokens"] == n
    assert res["loss"] == pytest.approx(total / n, rel=1e-5)
    assert res["perplexity"] == pytest.approx(np.exp(total / n), rel=1e-5)
    assert n <= 1024


def test_val_loss_missing_dir_is_a_user_error(make_gptlab, tmp_path):
    with pytest.raises(UserError):
        ev.evaluate_val_loss(make_gptlab(), tmp_path / "none", device="cpu", seq_len=16, batch_size=2)
