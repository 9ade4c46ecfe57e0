import json

import pytest
import torch

from gptlab import checkpoint as ck
from gptlab.rundir import RunDir
from gptlab.config import ModelConfig
from gptlab.errors import UserError
from gptlab.model import GPT

CFG = ModelConfig(n_layer=2, n_head=2, n_embd=16, seq_len=16, vocab_size=100)


def _model(seed=0):
    torch.manual_seed(seed)
    return GPT(CFG)


def test_model_dir_round_trip(tmp_path):
    m = _model()
    ck.save_model(m, tmp_path / "m")
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["config.json", "model.safetensors"]
    m2 = ck.load_model_dir(tmp_path / "m")
    for (k, a), (_, b) in zip(m.state_dict().items(), m2.state_dict().items()):
        assert torch.equal(a, b), k
    assert m2.lm_head.weight is m2.transformer.wte.weight


def test_wrapped_model_saved_without_prefixes(tmp_path):
    m = _model()
    wrapped = torch.nn.Module()
    wrapped.module = m  # what DDP looks like
    sd = ck.model_state_dict(wrapped)
    assert all(not k.startswith(("module.", "_orig_mod.")) for k in sd)
    assert "lm_head.weight" not in sd


def _opt_state(m):
    opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
    m(torch.randint(0, 100, (2, 8)), torch.randint(0, 100, (2, 8)))[1].backward()
    opt.step()
    return opt


def _save(run_path, step, model, opt_state, state, keep=0):
    """Save as training does: the checkpoint, then `latest`, then pruning."""
    run = RunDir(run_path)
    path = ck.save_checkpoint(run.checkpoint_path(step), model, opt_state, state)
    run.mark_latest(path)
    run.prune(keep)
    return path


def test_checkpoint_round_trip_and_latest(tmp_path):
    m = _model()
    opt = _opt_state(m)
    p = _save(tmp_path, 5, m, opt.state_dict(), {"step": 5, "tokens": 10})
    assert p.name == "step_000005"
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "step_000005"
    state, tensors = ck.load_checkpoint_state(p)
    assert state["step"] == 5 and all(isinstance(v, torch.Tensor) for v in tensors.values())
    # optimizer.pt is tensors only: it loads with weights_only
    torch.load(p / "optimizer.pt", weights_only=True)
    opt2 = torch.optim.AdamW(_model(1).parameters(), lr=1e-3)
    opt2.load_state_dict(ck.optimizer_from_files(tensors, state["optimizer"]))
    a, b = opt.state_dict(), opt2.state_dict()
    for i in a["state"]:
        for k in a["state"][i]:
            assert torch.equal(a["state"][i][k], b["state"][i][k])
    assert RunDir(tmp_path).latest_checkpoint() == p
    model, where = ck.load_model(tmp_path)  # a run directory is a MODEL
    assert where.endswith("step_000005")


def test_keep_newest(tmp_path):
    m = _model()
    for s in (1, 2, 3, 4):
        _save(tmp_path, s, m, None, {"step": s}, keep=2)
    names = sorted(p.name for p in (tmp_path / "checkpoints").glob("step_*"))
    assert names == ["step_000003", "step_000004"]


def test_crash_during_save_keeps_old_checkpoint(tmp_path, monkeypatch):
    m = _model()
    _save(tmp_path, 1, m, None, {"step": 1})

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(ck, "write_json", boom)
    with pytest.raises(OSError):
        _save(tmp_path, 2, _model(3), None, {"step": 2})
    monkeypatch.undo()
    assert RunDir(tmp_path).latest_checkpoint().name == "step_000001"
    assert not (tmp_path / "checkpoints" / "step_000002").exists()
    loaded, _ = ck.load_model(tmp_path)
    assert torch.equal(loaded.transformer.wte.weight, m.transformer.wte.weight)


class Evil:
    """An arbitrary object: loading it would need pickle."""


def test_pickled_optimizer_is_refused(tmp_path):
    m = _model()
    p = _save(tmp_path, 1, m, None, {"step": 1})

    torch.save({"x": Evil()}, p / "optimizer.pt")
    with pytest.raises(UserError, match="cannot be loaded safely"):
        ck.load_checkpoint_state(p)


def test_not_a_model_dir(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError):
        ck.load_model(tmp_path / "empty")
    with pytest.raises(UserError):
        ck.load_model_dir(tmp_path / "missing")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps(CFG.to_dict()))
    (bad / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(UserError, match="unreadable"):
        ck.load_model_dir(bad)
