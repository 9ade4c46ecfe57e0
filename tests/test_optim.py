"""optim.py: AdamW's groups and step, schedules; Muon beside AdamW (split, update, state round
trip, loss scaling, resume, DDP; FSDP and the shared work: test_muon.py)."""

import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from conftest import make_toy_data, read_metrics, run_gptlab, sigterm_after
from gptlab import checkpoint as ck
from gptlab.config import ModelConfig, TrainConfig, resolve_train_config
from gptlab.errors import UserError
from gptlab.model import GPT
from gptlab.optim import lr_at, make_adamw, make_optimizers, muon_split, param_groups, scale_lr
from gptlab.parallel import Placed, gather_state, load_optimizer
from gptlab.rundir import RunDir
from gptlab.runtime import get_runtime
from gptlab.train import train, train_step, validate


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


# ----------------------------------------------------------------------------- Muon beside AdamW

MICRO = ModelConfig(n_layer=2, n_head=2, n_embd=16, seq_len=8, vocab_size=100)


def muon_cfg(**kw) -> TrainConfig:
    base = dict(optimizer="muon", lr=3e-3, muon_lr=0.02, muon_momentum=0.95, muon_weight_decay=0.0)
    base.update(kw)
    return TrainConfig(**base)


def test_muon_takes_the_blocks_matrices_adamw_the_rest():
    model = GPT(MICRO)
    muon, rest = muon_split(model)
    names = {id(p): n for n, p in model.named_parameters()}
    assert sorted(names[id(p)] for p in muon) == sorted(
        f"transformer.h.{i}.{m}.weight" for i in range(2) for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"))
    assert all(p.dim() == 2 for p in muon)
    rest_names = {names[id(p)] for p in rest}
    assert {"transformer.wte.weight", "transformer.wpe.weight", "transformer.ln_f.weight"} <= rest_names
    assert all(p.dim() == 1 for p in rest if names[id(p)] not in ("transformer.wte.weight", "transformer.wpe.weight"))
    # every parameter exactly once; the tied head is the embedding, so it is AdamW's
    assert model.lm_head.weight is model.transformer.wte.weight
    assert sum(p.numel() for p in muon + rest) == model.num_params()
    assert len({id(p) for p in muon + rest}) == len(muon) + len(rest)


def test_make_optimizers_follows_the_config():
    model = GPT(MICRO)
    (adamw,) = make_optimizers(model, TrainConfig(optimizer="adamw", lr=1e-3), "cpu")
    assert isinstance(adamw, torch.optim.AdamW)
    adamw, muon = make_optimizers(model, muon_cfg(muon_lr=0.05, muon_momentum=0.9, muon_weight_decay=0.01,
                                                  weight_decay=0.2), "cpu")
    assert isinstance(adamw, torch.optim.AdamW) and isinstance(muon, torch.optim.Muon)
    (mg,) = muon.param_groups
    assert (mg["lr"], mg["momentum"], mg["weight_decay"], mg["nesterov"]) == (0.05, 0.9, 0.01, True)
    assert mg["adjust_lr_fn"] == "original"
    assert [g["weight_decay"] for g in adamw.param_groups] == [0.2, 0.0]
    # the schedule scales each group relative to its own peak
    scale_lr([adamw, muon], 0.5)
    assert mg["lr"] == pytest.approx(0.025) and all(g["lr"] == pytest.approx(1.5e-3) for g in adamw.param_groups)
    scale_lr([adamw, muon], 1.0)
    assert mg["lr"] == 0.05
    with pytest.raises(UserError, match="optimizer"):
        make_optimizers(model, TrainConfig(optimizer="sgd"), "cpu")


def test_muon_update_is_orthogonalised():
    """After one step, a block matrix moved by lr x sqrt(max(1, rows/cols)) x an (approximately)
    orthogonal matrix: all singular values near 1, whatever the gradient's spectrum. AdamW's
    first step moves every other element by about lr."""
    torch.manual_seed(0)
    model = GPT(MICRO)
    adamw, muon = make_optimizers(model, muon_cfg(muon_lr=0.02, lr=1e-3), "cpu")
    x = torch.randint(0, 100, (4, 8))
    model(x, x)[1].backward()
    w = model.transformer.h[0].mlp.c_fc.weight  # (64, 16)
    before, wte_before = w.detach().clone(), model.transformer.wte.weight.detach().clone()
    k = 12  # the top 12 of 16 directions (Newton-Schulz lifts the tiniest singular values only partly)
    grad_sv = torch.linalg.svdvals(w.grad)[:k]
    assert grad_sv[0] / grad_sv[-1] > 5, grad_sv  # the gradient is far from orthogonal
    adamw.step()
    muon.step()
    delta = (before - w.detach()) / (0.02 * (64 / 16) ** 0.5)
    sv = torch.linalg.svdvals(delta)[:k]
    assert sv.min() > 0.5 and sv.max() < 1.3, sv
    moved = (wte_before - model.transformer.wte.weight.detach()).abs()
    touched = model.transformer.wte.weight.grad.abs() > 0
    assert torch.allclose(moved[touched], torch.full_like(moved[touched], 1e-3), rtol=0.05)


def test_muon_orthogonalises_in_fp32_where_bf16_is_emulated(monkeypatch):
    """torch.optim.Muon's Newton-Schulz runs in bf16; on a CPU without native bf16 matmuls gptlab's
    Muon runs the same iteration in fp32: the step equals torch's own to bf16's precision (and is
    closer to an fp64 run of the iteration), the state dict is torch's, and torch's function is back
    in place after the step. Where bf16 is native, torch's iteration is kept."""
    import torch.optim._muon as impl

    from gptlab import optim as optim_mod

    original = impl._zeropower_via_newtonschulz
    torch.manual_seed(0)
    w0 = torch.randn(48, 16)
    grads = [torch.randn(48, 16) * torch.logspace(0, -2, 16) for _ in range(3)]  # a skewed spectrum
    kw = dict(lr=0.02, momentum=0.95, nesterov=True, weight_decay=0.0, adjust_lr_fn="original")

    def run(make):
        p = torch.nn.Parameter(w0.clone())
        opt = make([p])
        for g in grads:
            p.grad = g.clone()
            opt.step()
        return p.detach(), opt

    ours, opt = run(lambda ps: optim_mod.Muon(ps, ns_fp32=True, **kw))
    torchs, topt = run(lambda ps: torch.optim.Muon(ps, **kw))
    assert impl._zeropower_via_newtonschulz is original
    assert opt.state_dict()["state"][0].keys() == topt.state_dict()["state"][0].keys()
    ref = w0.double()  # the same updates, written out, with the iteration in float64
    buf = torch.zeros_like(ref)
    for g in grads:
        buf.lerp_(g.double(), 0.05)
        x = g.double().lerp(buf, 0.95).T  # (16, 48)
        x = x / x.norm()
        for _ in range(5):
            gram = x @ x.T
            x = 3.4445 * x + (-4.7750 * gram + 2.0315 * gram @ gram) @ x
        ref -= 0.02 * (48 / 16) ** 0.5 * x.T
    err_ours, err_torch = (ours.double() - ref).abs().max(), (torchs.double() - ref).abs().max()
    assert err_ours < 1e-5 < err_torch < 0.02 * 0.05, (err_ours, err_torch)
    # which iteration a run gets follows the device
    model = GPT(MICRO)
    monkeypatch.setattr(optim_mod, "native_bf16_matmul", lambda dev: False)
    assert make_optimizers(model, muon_cfg(), "cpu")[1].ns_fp32
    monkeypatch.setattr(optim_mod, "native_bf16_matmul", lambda dev: True)
    assert not make_optimizers(model, muon_cfg(), "cpu")[1].ns_fp32


def _step_all(model, opts, seed):
    torch.manual_seed(seed)
    x = torch.randint(0, 100, (4, 8))
    model(x, x)[1].backward()
    for o in opts:
        o.step()
        o.zero_grad(set_to_none=True)


def test_both_states_round_trip_through_checkpoint_files(tmp_path):
    """gather_state -> optimizer.pt (tensors only) + JSON -> load_optimizer gives optimizers that
    continue exactly like the originals; a later --lr / --muon-lr wins over the saved peak."""
    torch.manual_seed(0)
    model = GPT(MICRO)
    opts = make_optimizers(model, muon_cfg(), "cpu")
    for seed in range(3):
        _step_all(model, opts, seed)
    _, full = gather_state(Placed(model=model, forward=model), opts)
    tensors, meta = ck.optimizer_to_files(full)
    assert all(isinstance(v, torch.Tensor) for v in tensors.values())
    assert any(k.endswith("/momentum_buffer") for k in tensors) and any(k.endswith("/exp_avg") for k in tensors)
    meta = json.loads(json.dumps(meta))  # what state.json holds
    torch.save(tensors, tmp_path / "optimizer.pt")  # the files share no memory with the optimizers
    tensors = torch.load(tmp_path / "optimizer.pt", weights_only=True)

    twin = GPT(MICRO)
    twin.load_state_dict(model.state_dict())
    twin_opts = make_optimizers(twin, muon_cfg(muon_lr=0.04), "cpu")
    load_optimizer(Placed(model=twin, forward=twin), twin_opts, ck.optimizer_from_files(tensors, meta))
    assert twin_opts[1].param_groups[0]["peak_lr"] == 0.04  # this run's flag, not the checkpoint's
    scale_lr(twin_opts, 0.5)
    assert twin_opts[1].param_groups[0]["lr"] == 0.02
    scale_lr(twin_opts, 1.0)
    twin_opts[1].param_groups[0]["peak_lr"] = twin_opts[1].param_groups[0]["lr"] = 0.02
    for seed in (10, 11):
        _step_all(model, opts, seed)
        _step_all(twin, twin_opts, seed)
    for (n, a), b in zip(model.named_parameters(), twin.parameters()):
        assert torch.equal(a, b), n


def test_one_scaler_over_two_optimizers():
    """A loss-scaled step (as fp16 runs it) over AdamW + Muon equals the unscaled step."""
    rt = get_runtime("cpu", "fp32", False)
    results = []
    for scaler in (None, torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)):
        torch.manual_seed(0)
        model = GPT(MICRO)
        opts = make_optimizers(model, muon_cfg(), "cpu")
        x = torch.randint(0, 100, (4, 8))
        out = train_step(Placed(model=model, forward=model), rt, [(x, x)], 1, opts, scaler, grad_clip=1.0)
        assert out.applied
        results.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_fsdp_with_muon_is_accepted_and_unknown_optimizers_refused(cli, tmp_path):
    validate(muon_cfg(fsdp=True))  # Muon shares its work over FSDP's shards (tests/test_muon.py)
    validate(muon_cfg())
    r = cli("train", "--model", "tiny", "--optimizer", "lion", "--out", str(tmp_path / "r2"))
    assert r.returncode == 2 and "--optimizer must be one of adamw, muon" in r.stderr


# ----------------------------------------------------------------------------- training with Muon

SMALL = ["--model", "tiny", "--n-layer", "1", "--n-head", "2", "--n-embd", "32", "--seq-len", "32", "--vocab-size", "320"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return make_toy_data(tmp_path_factory.mktemp("mdata"), 20_000, 200_000)


def train_losses(run: Path, kind: str = "train") -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run, kind)}


def muon_flags(data_dir, out, **kw):
    base = dict(model="tiny", n_layer=1, n_head=2, n_embd=32, seq_len=32, data=str(data_dir), out=str(out),
                batch_size=4, total_batch_tokens=256, max_steps=12, lr=1e-2, warmup_steps=3, eval_every=0,
                eval_tokens=2048, sample_tokens=0, checkpoint_every=0, device="cpu", optimizer="muon")
    base.update(kw)
    return base


def test_muon_run_learns_and_resumes_exactly(data_dir, tmp_path):
    train(resolve_train_config(muon_flags(data_dir, tmp_path / "full", eval_every=12)))
    train(resolve_train_config(muon_flags(data_dir, tmp_path / "part", checkpoint_every=5)))
    full = train_losses(tmp_path / "full")
    assert full[12] < full[1] - 2.0
    # each record logs both rates: AdamW's as "lr", Muon's (the same schedule, its own peak) as "muon_lr"
    recs = read_metrics(tmp_path / "full", "train")
    assert [r["muon_lr"] for r in recs] == pytest.approx([r["lr"] / 1e-2 * 0.02 for r in recs])
    # throw away everything after step 5 and resume from its checkpoint
    ckdir = tmp_path / "part" / "checkpoints"
    for p in ckdir.glob("step_*"):
        if p.name != "step_000005":
            shutil.rmtree(p)
    (ckdir / "latest").write_text("step_000005\n")
    state = json.loads((ckdir / "step_000005" / "state.json").read_text())
    assert len(state["optimizer"]["param_groups"]) == 3  # AdamW's two groups and Muon's one
    tensors = torch.load(ckdir / "step_000005" / "optimizer.pt", weights_only=True)
    assert sum(k.endswith("/momentum_buffer") for k in tensors) == 4  # the block's four matrices
    with pytest.raises(UserError, match="--optimizer adamw would change the optimizer"):
        train(resolve_train_config({"out": str(tmp_path / "part")}), resume=True, resume_flags={"optimizer": "adamw"})
    train(resolve_train_config({"out": str(tmp_path / "part")}), resume=True, resume_flags={})
    assert train_losses(tmp_path / "part") == full  # bit-identical floats on CPU
    assert json.loads((tmp_path / "full" / "config.json").read_text())["train"]["optimizer"] == "muon"
    # the GPT-3 recipe stays the default
    assert resolve_train_config({"model": "gpt2"}).optimizer == "adamw"


@pytest.mark.slow
def test_muon_sigterm_then_resume_is_exact(data_dir, tmp_path):
    common = ["train", *SMALL, "--data", str(data_dir), "--batch-size", "4", "--total-batch-tokens", "256",
              "--max-steps", "20", "--warmup-steps", "3", "--eval-every", "0", "--optimizer", "muon",
              "--sample-tokens", "0", "--checkpoint-every", "0", "--device", "cpu"]
    r = run_gptlab(*common, "--out", str(tmp_path / "full"), timeout=900)
    assert r.returncode == 0, r.stderr
    run = tmp_path / "stopped"
    code, err = sigterm_after([*common, "--out", run], run / "metrics.jsonl", lines=5, timeout=600)
    assert code == 143, err
    stopped_at = int(RunDir(run).latest_checkpoint().name.split("_")[1])
    assert 5 <= stopped_at < 20
    r = run_gptlab("train", "--out", str(run), "--resume", timeout=900)
    assert r.returncode == 0, r.stderr
    full, resumed = train_losses(tmp_path / "full"), train_losses(run)
    assert sorted(full) == sorted(resumed)
    for s in full:
        assert resumed[s] == pytest.approx(full[s], abs=1e-6), s


# 2 ranks = 1 with Muon (DDP and FSDP, train and val losses, 1e-4) and exact resume: tests/test_muon.py
