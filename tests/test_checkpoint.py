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


# ----------------------------------------------------------------------------- crafted and damaged files

def _train_checkpoint(tmp_path):
    """A checkpoint as training writes one, and the parameter shapes a resume checks it against."""
    m = _model()
    opt = _opt_state(m)
    named = {id(p): n for n, p in m.named_parameters()}
    sd = opt.state_dict()
    # training saves the optimizer keyed by parameter name (torch.distributed.checkpoint's full state)
    names = [named[id(p)] for p in opt.param_groups[0]["params"]]
    state = {"state": {names[i]: v for i, v in sd["state"].items()},
             "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in sd["param_groups"]]}
    p = _save(tmp_path, 3, m, state, {"step": 3, "tokens": 96, "loader": {}})
    return p, {n: tuple(q.shape) for n, q in m.named_parameters()}


def test_resume_checks_accept_an_honest_checkpoint(tmp_path):
    p, shapes = _train_checkpoint(tmp_path)
    state, tensors = ck.load_checkpoint_state(p, param_shapes=shapes)
    assert state["step"] == 3 and len(tensors) == 3 * len(shapes)


def test_wrong_shaped_optimizer_tensor_is_one_error(tmp_path):
    p, shapes = _train_checkpoint(tmp_path)
    tensors = torch.load(p / "optimizer.pt", weights_only=True)
    key = next(k for k in tensors if k.endswith("/exp_avg"))
    tensors[key] = torch.zeros(3, 3)
    torch.save(tensors, p / "optimizer.pt")
    with pytest.raises(UserError, match="holds other tensors than the checkpoint recorded"):
        ck.load_checkpoint_state(p, param_shapes=shapes)
    # a checkpoint that records no tensor list (older) is still checked against the model
    state = json.loads((p / "state.json").read_text())
    del state["optimizer"]["tensors"]
    (p / "state.json").write_text(json.dumps(state))
    with pytest.raises(UserError, match=r"exp_avg has shape \(3, 3\), the parameter has"):
        ck.load_checkpoint_state(p, param_shapes=shapes)


def test_empty_or_missing_optimizer_is_refused_for_a_resume(tmp_path):
    p, shapes = _train_checkpoint(tmp_path)
    torch.save({}, p / "optimizer.pt")  # an empty dict of tensors
    with pytest.raises(UserError, match="other tensors than the checkpoint recorded"):
        ck.load_checkpoint_state(p, param_shapes=shapes)
    (p / "optimizer.pt").unlink()
    with pytest.raises(UserError, match="no optimizer state"):
        ck.load_checkpoint_state(p, param_shapes=shapes)


@pytest.mark.parametrize("key, value, message", [
    ("step", "12", "step must be a non-negative integer"),
    ("tokens", -1, "tokens must be a non-negative integer"),
    ("loader", [1, 2], "loader must be an object"),
    ("world_size", 0, "world_size must be a positive integer"),
    ("rng", [{"torch": [300], "python": [3, [], None]}], "rng must be a list of RNG states"),
    ("optimizer", {"param_groups": [{"lr": float("nan"), "params": []}]}, "optimizer lr must be a finite"),
    ("optimizer", {"param_groups": "x"}, "param_groups must be a non-empty list"),
])
def test_bad_value_in_state_json_is_one_error(tmp_path, key, value, message):
    p, shapes = _train_checkpoint(tmp_path)
    state = json.loads((p / "state.json").read_text())
    state[key] = value
    (p / "state.json").write_text(json.dumps(state))
    with pytest.raises(UserError, match=message):
        ck.load_checkpoint_state(p, param_shapes=shapes)


def test_oversized_config_is_refused_before_allocating(tmp_path):
    m = _model()
    ck.save_model(m, tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    (tmp_path / "m" / "config.json").write_text(json.dumps({**cfg, "n_layer": 100_000, "n_embd": 8192,
                                                            "n_head": 64}))
    with pytest.raises(UserError, match="weights do not match the config .*describes a model of .* parameters, the weights hold"):
        ck.load_model(tmp_path / "m")
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg) + " " * (2 << 20))
    with pytest.raises(UserError, match="too large for this file"):
        ck.load_model(tmp_path / "m")


def test_nan_weights_are_one_error(cli, tmp_path):
    m = _model()
    with torch.no_grad():
        m.transformer.h[1].mlp.c_fc.weight[0, 0] = float("nan")
    ck.save_model(m, tmp_path / "m")
    with pytest.raises(UserError, match="non-finite weights .* transformer.h.1.mlp.c_fc.weight"):
        ck.load_model(tmp_path / "m")
    r = cli("sample", tmp_path / "m", "--max-new-tokens", "2")
    assert r.returncode == 2 and "non-finite weights" in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_fp16_and_int64_weights_are_announced(tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    m = _model()
    ck.save_model(m, tmp_path / "m")
    sd = load_file(str(tmp_path / "m" / "model.safetensors"))
    sd = {k: v.half() for k, v in sd.items()}
    sd["transformer.ln_f.bias"] = sd["transformer.ln_f.bias"].long()
    save_file(sd, str(tmp_path / "m" / "model.safetensors"))
    ck.load_model(tmp_path / "m")
    err = capsys.readouterr().err
    assert "stores float16, int64 weights; converted to float32 (integer tensors as weights" in err


def test_full_disk_during_save_is_one_line_and_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    """ENOSPC injected into the checkpoint writer, after part of a file was written."""
    import errno

    from gptlab.atomic import DiskFullError

    m = _model()
    _save(tmp_path, 1, m, None, {"step": 1})
    real = ck.save_file

    def half_then_full(tensors, filename, metadata=None):
        real(tensors, filename, metadata=metadata)
        with open(filename, "r+b") as f:
            f.truncate(100)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ck, "save_file", half_then_full)
    with pytest.raises(DiskFullError, match=r"no space left on the disk mounted at /.* while writing .*step_000002"):
        _save(tmp_path, 2, _model(3), None, {"step": 2})
    monkeypatch.undo()
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["latest", "step_000001"]
    loaded, _ = ck.load_model(tmp_path)
    assert torch.equal(loaded.transformer.wte.weight, m.transformer.wte.weight)
