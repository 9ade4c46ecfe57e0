"""The Python API at the package's top level: GPT.from_pretrained, model.generate (nanoGPT's
signature, on the KV cache), and gptlab.train applying the preset's recipe as the CLI does."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings

import pytest
import torch

import gptlab
from conftest import make_toy_data, random_gptlab
from gptlab.config import TrainConfig
from gptlab.errors import UserError
from gptlab.generate import generate_ids, make_generator


def test_import_gptlab_is_cheap_and_exports_the_api():
    code = ("import sys, gptlab\n"
            "assert 'torch' not in sys.modules, 'import gptlab imported torch'\n"
            "from gptlab import TrainConfig, ModelConfig\n"
            "assert 'torch' not in sys.modules, 'the config names imported torch'\n"
            "from gptlab import GPT, train\n"
            "assert callable(train) and hasattr(train, 'Trainer') and hasattr(GPT, 'generate')\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert {"GPT", "ModelConfig", "TrainConfig", "train"} <= set(gptlab.__all__)
    with pytest.raises(AttributeError):
        gptlab.nothing_here


def test_from_pretrained_loads_what_sample_takes(gptlab_model_dir, hf_gpt2_dir):
    from gptlab.checkpoint import load_model

    model = gptlab.GPT.from_pretrained(gptlab_model_dir)
    assert isinstance(model, gptlab.GPT) and not model.training
    ref, _ = load_model(gptlab_model_dir)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), ref.state_dict().values()))
    hf = gptlab.GPT.from_pretrained(str(hf_gpt2_dir))  # a local Hugging Face directory
    assert isinstance(hf, gptlab.GPT) and not hf.training
    with pytest.raises(UserError):
        gptlab.GPT.from_pretrained(str(gptlab_model_dir / "missing"))


def test_greedy_generate_equals_gptlab_generate_and_sample(gptlab_model_dir, cli):
    model = gptlab.GPT.from_pretrained(gptlab_model_dir)
    prompt = [50256]
    out = model.generate(torch.tensor([prompt]), 12, temperature=0.0)
    assert out.shape == (1, 13) and out[0, 0].item() == 50256
    (want,) = generate_ids(model, prompt, max_new_tokens=12, temperature=0.0, top_k=None, stop_token=None)
    assert out[0, 1:].tolist() == want
    r = cli("sample", gptlab_model_dir, "--temperature", "0", "--max-new-tokens", "12", "--json")
    assert r.returncode == 0, r.stderr
    tokens = json.loads(r.stdout)["samples"][0]["tokens"]
    assert out[0, 1:1 + len(tokens)].tolist() == tokens  # sample stops early at <|endoftext|> only


def test_seeded_generate_equals_gptlab_sample_seed(gptlab_model_dir, cli):
    model = gptlab.GPT.from_pretrained(gptlab_model_dir)
    out = model.generate(torch.tensor([[50256]]), 10, top_k=50, generator=make_generator("cpu", 7))
    r = cli("sample", gptlab_model_dir, "--seed", "7", "--max-new-tokens", "10", "--json")
    assert r.returncode == 0, r.stderr
    tokens = json.loads(r.stdout)["samples"][0]["tokens"]
    assert len(tokens) >= 1 and out[0, 1:1 + len(tokens)].tolist() == tokens


def test_generate_rows_match_single_prompts():
    model = random_gptlab(seed=3, noise=0.3)
    idx = torch.randint(0, 1000, (3, 5), generator=torch.Generator().manual_seed(0))
    out = model.generate(idx, 7, temperature=0)
    assert out.shape == (3, 12) and torch.equal(out[:, :5], idx)
    for row in range(3):
        (want,) = generate_ids(model, idx[row].tolist(), max_new_tokens=7, temperature=0, top_k=None,
                               stop_token=None)
        assert out[row, 5:].tolist() == want


def test_sampling_is_reproducible_and_equals_sample_for_a_seed():
    model = random_gptlab(seed=4, noise=0.3)
    idx = torch.tensor([[1, 2, 3]])
    a = model.generate(idx, 10, temperature=1.0, top_k=50, generator=make_generator("cpu", 7))
    b = model.generate(idx, 10, temperature=1.0, top_k=50, generator=make_generator("cpu", 7))
    assert torch.equal(a, b)
    (want,) = generate_ids(model, [1, 2, 3], max_new_tokens=10, temperature=1.0, top_k=50, seed=7, stop_token=None)
    assert a[0, 3:].tolist() == want
    torch.manual_seed(11)  # the global RNG, as nanoGPT samples
    c = model.generate(idx, 10)
    torch.manual_seed(11)
    assert torch.equal(c, model.generate(idx, 10))


def test_top_k_is_respected():
    model = random_gptlab(seed=5, noise=0.3)
    idx = torch.tensor([[7, 8]])
    torch.manual_seed(0)
    out = model.generate(idx.expand(64, -1).contiguous(), 1, temperature=5.0, top_k=3)
    allowed = set(model(idx)[0][0, -1].topk(3).indices.tolist())
    drawn = set(out[:, -1].tolist())
    assert drawn <= allowed and len(drawn) > 1
    with pytest.raises(UserError):
        model.generate(idx, 1, top_k=-1)


def test_generate_past_the_context_crops_like_nanogpt():
    model = random_gptlab(seed=6, noise=0.3, seq_len=16)
    idx = torch.randint(0, 1000, (2, 20), generator=torch.Generator().manual_seed(1))  # longer than seq_len
    out = model.generate(idx, 10, temperature=0)
    assert out.shape == (2, 30) and torch.equal(out[:, :20], idx)
    # nanoGPT's loop: the full forward pass over the last seq_len tokens, one token at a time
    ref = idx
    with torch.no_grad():
        for _ in range(10):
            logits, _ = model(ref[:, -16:])
            ref = torch.cat([ref, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, ref)
    assert model.generate(idx, 0).shape == (2, 20)
    with pytest.raises(ValueError, match="LongTensor"):
        model.generate(idx.float(), 1)


def test_generate_keeps_training_mode():
    model = random_gptlab(seed=2).train()
    model.generate(torch.tensor([[1]]), 2)
    assert model.training


# ----------------------------------------------------------------------------- training from Python

def test_trainconfig_for_model_applies_the_preset_as_the_cli():
    from gptlab.config import TRAIN_PRESETS, resolve_train_config

    cfg = TrainConfig.for_model("tiny", max_steps=5)
    assert cfg == resolve_train_config({"model": "tiny", "max_steps": 5})
    assert cfg.lr == TRAIN_PRESETS["tiny"]["lr"] and cfg.total_batch_tokens == 4096 and cfg.max_steps == 5
    cfg.check_recipe()
    TrainConfig(model="gpt2").check_recipe()  # gpt2's recipe is TrainConfig's own defaults


def test_a_bare_trainconfig_of_another_preset_is_refused(tmp_path):
    """The trap: TrainConfig(model="tiny") kept the gpt2 recipe (batch 32, 524,288 tokens a step,
    19,073 steps, lr 6e-4) and one step ran for minutes. Now it is one line, before any work."""
    cfg = TrainConfig(model="tiny", max_steps=2, out=str(tmp_path / "run"))
    with pytest.raises(UserError, match=r"gpt2 recipe's .*total_batch_tokens=524288.*TrainConfig.for_model\('tiny'"):
        cfg.check_recipe()
    with pytest.raises(UserError, match="for_model"):
        gptlab.train(cfg)
    from gptlab.train import train
    with pytest.raises(UserError, match="for_model"):
        train(cfg)
    assert not (tmp_path / "run").exists()
    with pytest.raises(UserError, match="lr=0.0006"):
        TrainConfig(model="gpt2-medium").check_recipe()


def test_gptlab_train_with_keywords_trains_the_tiny_recipe(tmp_path):
    data = make_toy_data(tmp_path / "data")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = gptlab.train(model="tiny", data=str(data), out=str(tmp_path / "run"), max_steps=2, n_layer=1,
                           n_head=2, n_embd=32, seq_len=32, batch_size=4, total_batch_tokens=128,
                           eval_every=0, sample_tokens=0, device="cpu", compile=False)
    assert res.steps == 2
    saved = json.loads((tmp_path / "run" / "config.json").read_text())["train"]
    assert saved["lr"] == 3e-3 and saved["warmup_steps"] == 10  # tiny's, not gpt2's 6e-4 and 715
    with pytest.raises(TypeError):
        gptlab.train(TrainConfig.for_model("tiny"), max_steps=3)
