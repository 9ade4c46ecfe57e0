import math

import pytest
import torch

from gptlab.config import ModelConfig
from gptlab.errors import UserError
from gptlab.model import GPT
from gptlab.optim import lr_at, make_adamw, param_groups


def test_param_groups_decay_only_2d_weights():
    model = GPT(ModelConfig(n_layer=2, n_head=2, n_embd=16, seq_len=8, vocab_size=100))
    decay, no_decay = param_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() == 2 for p in decay["params"])
    assert all(p.dim() == 1 for p in no_decay["params"])
    # the tied head is counted once; every parameter is in exactly one group
    n = sum(p.numel() for g in (decay, no_decay) for p in g["params"])
    assert n == model.num_params()
    # wte (also the head) decays; LayerNorm gains and biases do not
    assert any(p is model.transformer.wte.weight for p in decay["params"])
    assert any(p is model.transformer.ln_f.weight for p in no_decay["params"])


def test_adamw_recipe_one_step_by_hand():
    """One AdamW step equals the update written out by hand: decoupled weight decay on 2-D
    weights only, bias-corrected moments, betas (0.9, 0.95), eps 1e-8."""
    torch.manual_seed(0)
    model = GPT(ModelConfig(n_layer=1, n_head=1, n_embd=8, seq_len=4, vocab_size=64))
    lr, wd, (b1, b2), eps = 6e-4, 0.1, (0.9, 0.95), 1e-8
    opt = make_adamw(model, lr=lr, weight_decay=wd, betas=(b1, b2), eps=eps, device_type="cpu")
    x = torch.randint(0, 64, (2, 4))
    model(x, x)[1].backward()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    opt.step()
    for n, p in model.named_parameters():
        g, w = grads[n].double(), before[n].double()
        decay = wd if p.dim() >= 2 else 0.0
        m = (1 - b1) * g  # first step: the moments start at zero
        v = (1 - b2) * g * g
        m_hat, v_hat = m / (1 - b1), v / (1 - b2)
        want = w * (1 - lr * decay) - lr * m_hat / (v_hat.sqrt() + eps)
        torch.testing.assert_close(p.detach().double(), want, rtol=1e-5, atol=1e-7, msg=n)
    # decay really differs between the groups: a LayerNorm gain is not shrunk, a matmul weight is
    assert (1 - lr * wd) != 1.0


def test_cosine_schedule_gpt3_recipe():
    kw = dict(schedule="cosine", max_lr=6e-4, total_steps=19073, warmup_steps=715, min_lr_ratio=0.1)
    assert lr_at(0, **kw) == pytest.approx(6e-4 / 715)
    assert lr_at(714, **kw) == pytest.approx(6e-4)
    assert lr_at(715, **kw) == pytest.approx(6e-4)
    mid = 715 + (19073 - 715) // 2
    assert lr_at(mid, **kw) == pytest.approx(3.3e-4, rel=1e-3)
    assert lr_at(19073, **kw) == pytest.approx(6e-5)
    lrs = [lr_at(s, **kw) for s in range(715, 19073)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))


def test_other_schedules():
    assert lr_at(50, schedule="constant", max_lr=1.0, total_steps=100, warmup_steps=10) == 1.0
    lin = [lr_at(s, schedule="linear", max_lr=1.0, total_steps=100, warmup_steps=10, min_lr_ratio=0.0)
           for s in range(10, 101)]
    assert lin[0] == 1.0 and lin[-1] == 0.0
    assert lin[45] == pytest.approx(0.5)
    wsd = dict(schedule="wsd", max_lr=1.0, total_steps=100, warmup_steps=10, min_lr_ratio=0.0, decay_frac=0.2)
    assert lr_at(50, **wsd) == 1.0 and lr_at(79, **wsd) == 1.0
    assert lr_at(90, **wsd) == pytest.approx(0.5)
    with pytest.raises(UserError):
        lr_at(50, schedule="nope", max_lr=1.0, total_steps=100, warmup_steps=0)
    assert math.isfinite(lr_at(0, schedule="cosine", max_lr=1.0, total_steps=1, warmup_steps=0))
