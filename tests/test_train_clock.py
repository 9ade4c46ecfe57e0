"""Train records count the time spent in evaluation and checkpoints (eval_s, checkpoint_s) and give
a wall-clock MFU next to the step MFU; samples during training run under the run's autocast."""

import time

import pytest
import torch

from conftest import make_toy_data, metrics_by_step
from gptlab import train as train_module
from gptlab.config import resolve_train_config
from gptlab.metrics import RunClock


def _cfg(tmp_path, **kw):
    base = dict(model="tiny", n_layer=2, n_head=4, n_embd=32, seq_len=16, vocab_size=320, batch_size=4,
                total_batch_tokens=64, max_steps=4, lr=1e-2, warmup_steps=1, eval_every=2, eval_tokens=128,
                checkpoint_every=2, sample_tokens=0, device="cpu", out=str(tmp_path / "run"),
                data=str(make_toy_data(tmp_path / "data", 2_000, 10_000)))
    return resolve_train_config({**base, **kw})


def test_train_records_count_eval_and_checkpoint_time(tmp_path, monkeypatch):
    real_eval, real_save = train_module.Trainer._evaluate, train_module.Trainer._save

    def slow_eval(self):
        time.sleep(0.2)
        return real_eval(self)

    def slow_save(self, wait):
        time.sleep(0.1)
        return real_save(self, wait)

    monkeypatch.setattr(train_module.Trainer, "_evaluate", slow_eval)
    monkeypatch.setattr(train_module.Trainer, "_save", slow_save)
    monkeypatch.setattr(train_module.Runtime, "peak_flops", lambda self: 1e12, raising=False)
    train_module.train(_cfg(tmp_path))
    rec = metrics_by_step(tmp_path / "run", "train")
    assert rec[1]["eval_s"] == 0 and rec[1]["checkpoint_s"] == 0
    assert rec[2]["eval_s"] == 0  # step 2's evaluation runs after its record
    assert 0.2 <= rec[3]["eval_s"] == rec[4]["eval_s"] < 5  # cumulative
    assert 0.1 <= rec[3]["checkpoint_s"] == rec[4]["checkpoint_s"] < 5
    assert rec[4]["wall_s"] > rec[4]["eval_s"] + rec[4]["checkpoint_s"]
    # the MFU of the steps' own time so far (mfu / tok_per_s is the same for every step)
    steps_only = {}
    for n in sorted(rec):
        step_time = sum(64 / rec[i]["tok_per_s"] for i in range(1, n + 1))
        steps_only[n] = rec[n]["mfu"] / rec[n]["tok_per_s"] * 64 * n / step_time
    for n, r in rec.items():
        assert 0 < r["wall_mfu"] <= steps_only[n] * 1.01  # the wall clock also pays for what runs between steps
    assert rec[4]["wall_mfu"] < steps_only[4] * 0.9  # the 0.3 s of evaluation and checkpoints were counted


def test_run_clock_fields():
    clock = RunClock()
    with clock.timing("eval"):
        time.sleep(0.05)
    f = clock.step_fields(0.1, 1000, 6.0, 1e6)
    assert f["eval_s"] >= 0.05 and f["checkpoint_s"] == 0 and f["wall_s"] == pytest.approx(0.1, abs=0.02)
    assert f["wall_mfu"] == pytest.approx(6.0 * 1000 / (f["wall_s"] * 1e6), rel=0.01)
    assert clock.step_fields(0.1, 1000, 6.0, None)["wall_mfu"] is None


def test_samples_during_training_use_autocast(tmp_path, monkeypatch):
    seen = []
    real = train_module.generate_ids

    def recording(*a, **kw):
        seen.append((torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")))
        return real(*a, **kw)

    monkeypatch.setattr(train_module, "generate_ids", recording)
    cfg = _cfg(tmp_path, dtype="bf16", max_steps=2, checkpoint_every=0, sample_tokens=2, num_samples=1, vocab_size=None)
    train_module.train(cfg)
    assert seen and all(s == (True, torch.bfloat16) for s in seen)
