"""Hugging Face GPT-2 in and out, checked against transformers' GPT2LMHeadModel."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from gptlab import hf
from gptlab.checkpoint import load_model, save_model
from gptlab.errors import UserError

ATOL = 1e-4


def _tokens(n=2, t=24, seed=0):
    return torch.randint(0, 50257, (n, t), generator=torch.Generator().manual_seed(seed))


def _max_diff(hf_model, gptlab_model, x):
    with torch.no_grad():
        ref = hf_model(x).logits
        ours, _ = gptlab_model(x)
    assert ours.shape == ref.shape
    return (ours - ref).abs().max().item()


# ----------------------------------------------------------------------------- in

def test_logits_match_transformers(hf_gpt2_dir):
    from transformers import GPT2LMHeadModel

    ref = GPT2LMHeadModel.from_pretrained(hf_gpt2_dir).eval()
    ours = hf.load_hf_dir(hf_gpt2_dir)
    assert ours.config.padded_vocab_size == 50304
    assert torch.count_nonzero(ours.transformer.wte.weight[50257:]) == 0  # zero padding rows
    assert _max_diff(ref, ours, _tokens()) <= ATOL


def test_load_model_routes_a_local_hf_dir(hf_gpt2_dir):
    model, where = load_model(str(hf_gpt2_dir))
    assert where == str(hf_gpt2_dir) and not model.training


def test_pytorch_model_bin_without_prefix_with_buffers(tmp_path, make_hf_gpt2):
    """The original OpenAI-era layout: pytorch_model.bin, keys without `transformer.`, the causal
    mask buffers saved, and an explicit lm_head equal to wte."""
    ref = make_hf_gpt2(seed=3)
    sd = {}
    for k, v in ref.state_dict().items():
        sd[k.removeprefix("transformer.")] = v.clone()
    for i in range(ref.config.n_layer):
        sd[f"h.{i}.attn.bias"] = torch.tril(torch.ones(1, 1, 64, 64))
        sd[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    sd["lm_head.weight"] = sd["wte.weight"].clone()
    ref.config.save_pretrained(tmp_path)
    torch.save(sd, tmp_path / "pytorch_model.bin")
    ours = hf.load_hf_dir(tmp_path)
    assert _max_diff(ref, ours, _tokens(seed=1)) <= ATOL


class _Trap:
    """A pickle that would create a file if it were ever unpickled."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_pickled_objects_are_refused(tmp_path, make_hf_gpt2):
    make_hf_gpt2().config.save_pretrained(tmp_path)
    marker = tmp_path / "was-unpickled"
    torch.save({"transformer.wte.weight": torch.zeros(3), "x": _Trap(str(marker))}, tmp_path / "pytorch_model.bin")
    with pytest.raises(UserError, match="refused"):
        hf.load_hf_dir(tmp_path)
    assert not marker.exists()


def test_sharded_safetensors(tmp_path, make_hf_gpt2):
    from safetensors.torch import save_file

    ref = make_hf_gpt2(seed=4)
    ref.config.save_pretrained(tmp_path)
    sd = {k: v.contiguous() for k, v in ref.state_dict().items() if k != "lm_head.weight"}
    names = sorted(sd)
    shards = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
              "model-00002-of-00002.safetensors": names[len(names) // 2:]}
    weight_map = {}
    for shard, keys in shards.items():
        save_file({k: sd[k] for k in keys}, str(tmp_path / shard))
        weight_map.update({k: shard for k in keys})
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    assert _max_diff(ref, hf.load_hf_dir(tmp_path), _tokens()) <= ATOL


def _write_config(path: Path, **changes) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    cfg = {"model_type": "gpt2", "n_layer": 2, "n_head": 4, "n_embd": 32, "n_positions": 64, "vocab_size": 50257}
    cfg.update(changes)
    (path / "config.json").write_text(json.dumps(cfg))
    return path


@pytest.mark.parametrize("changes, message", [
    ({"model_type": "llama"}, "model_type 'llama' is not supported"),
    ({"activation_function": "relu"}, "activation_function 'relu'"),
    ({"n_inner": 100}, "n_inner 100"),
    ({"scale_attn_by_inverse_layer_idx": True}, "attention scaling"),
    ({"n_head": 5}, "divisible by n_head"),
])
def test_unsupported_configs_are_refused(tmp_path, changes, message):
    with pytest.raises(UserError, match=message):
        hf.load_hf_dir(_write_config(tmp_path / "m", **changes))


def test_config_without_weights(tmp_path):
    with pytest.raises(UserError, match="no model.safetensors or pytorch_model.bin"):
        hf.load_hf_dir(_write_config(tmp_path / "m"))


def test_weights_that_do_not_fit_the_config(tmp_path, hf_gpt2_dir):
    path = _write_config(tmp_path / "m", n_layer=3)
    (path / "model.safetensors").write_bytes((hf_gpt2_dir / "model.safetensors").read_bytes())
    with pytest.raises(UserError, match="do not match the config"):
        hf.load_hf_dir(path)


def test_untied_head_is_refused(tmp_path, make_hf_gpt2):
    from safetensors.torch import save_file

    ref = make_hf_gpt2()
    ref.config.save_pretrained(tmp_path)
    sd = {k: v.clone().contiguous() for k, v in ref.state_dict().items()}
    sd["lm_head.weight"] += 1.0
    save_file(sd, str(tmp_path / "model.safetensors"))
    with pytest.raises(UserError, match="ties them"):
        hf.load_hf_dir(tmp_path)


# ----------------------------------------------------------------------------- hub

@pytest.mark.parametrize("s, expected", [
    ("gpt2", True), ("gpt2-medium", True), ("gpt2-large", True), ("gpt2-xl", True),
    ("openai-community/gpt2", True), ("someone/my_model.v2", True),
    ("gpt3", False), ("runs", False), ("./gpt2", False), ("/abs/path", False), ("a/b/c", False),
    ("../x", False), ("owner/..", False), ("", False),
])
def test_looks_like_hub_id(s, expected):
    assert hf.looks_like_hub_id(s) is expected


def test_a_path_under_an_existing_dir_is_not_a_hub_id(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    assert not hf.looks_like_hub_id("runs/typo")  # a mistyped local path: fail fast, no download
    assert hf.looks_like_hub_id("someone/typo")


def test_load_hub_downloads_then_loads_as_a_local_dir(monkeypatch, hf_gpt2_dir):
    import huggingface_hub

    asked = []

    def fake_download(repo_id, filename, **kwargs):
        asked.append((repo_id, filename))
        return str(hf_gpt2_dir / filename)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    model = hf.load_hub("gpt2")
    assert asked == [("openai-community/gpt2", "config.json"), ("openai-community/gpt2", "model.safetensors")]
    ref = hf.load_hf_dir(hf_gpt2_dir)
    x = _tokens()
    with torch.no_grad():
        assert torch.equal(model(x)[0], ref(x)[0])


def test_load_hub_falls_back_to_pytorch_model_bin(monkeypatch, tmp_path, make_hf_gpt2):
    import huggingface_hub
    from huggingface_hub import errors

    ref = make_hf_gpt2(seed=5)
    ref.config.save_pretrained(tmp_path)
    torch.save(ref.state_dict(), tmp_path / "pytorch_model.bin")
    missing = getattr(errors, "RemoteEntryNotFoundError", errors.EntryNotFoundError)

    def fake_download(repo_id, filename, **kwargs):
        if not (tmp_path / filename).exists():
            e = missing.__new__(missing)
            Exception.__init__(e, f"404: {filename} not in {repo_id}")
            raise e
        return str(tmp_path / filename)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    assert _max_diff(ref, hf.load_hub("someone/old-gpt2"), _tokens()) <= ATOL


def test_load_hub_failure_is_one_clear_line(monkeypatch):
    import huggingface_hub

    def fail(repo_id, filename, **kwargs):
        raise ConnectionError("Name or service not known\nsecond line of detail")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fail)
    with pytest.raises(UserError) as info:
        hf.load_hub("someone/model")
    msg = str(info.value)
    assert "could not download 'someone/model'" in msg and "local directory" in msg
    assert "\n" not in msg and "second line" not in msg


# ----------------------------------------------------------------------------- out

@pytest.mark.parametrize("vocab_multiple", [64, 128, 1])
def test_export_loads_in_transformers_with_the_same_logits(tmp_path, make_gptlab, vocab_multiple):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ours = make_gptlab(seed=7, vocab_multiple=vocab_multiple)
    out = hf.export_hf(ours, tmp_path / "export")
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json", "merges.txt", "model.safetensors", "special_tokens_map.json",
        "tokenizer_config.json", "vocab.json"]
    assert not list(tmp_path.glob(".export*"))  # no temporary directory left behind
    sd = load_file(str(out / "model.safetensors"))
    assert sd["transformer.wte.weight"].shape == (50257, 32)
    assert sd["transformer.h.0.attn.c_attn.weight"].shape == (32, 96)  # Conv1D: (in, out)
    assert "lm_head.weight" not in sd
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "gpt2" and cfg["vocab_size"] == 50257 and cfg["n_positions"] == 64
    assert cfg["architectures"] == ["GPT2LMHeadModel"] and cfg["eos_token_id"] == 50256

    ref = AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(ref).__name__ == "GPT2LMHeadModel"
    assert ref.lm_head.weight.data_ptr() == ref.transformer.wte.weight.data_ptr()  # tied on load
    assert _max_diff(ref, ours, _tokens()) <= ATOL

    tok = AutoTokenizer.from_pretrained(out)
    assert tok("Hello world")["input_ids"] == [15496, 995]
    assert tok.eos_token_id == 50256 and tok.decode([15496, 995]) == "Hello world"


def test_export_then_import_is_exact(tmp_path, make_gptlab):
    ours = make_gptlab(seed=8)
    back = hf.load_hf_dir(hf.export_hf(ours, tmp_path / "e"))
    for (k, a), (k2, b) in zip(ours.state_dict().items(), back.state_dict().items()):
        assert k == k2
        if k in ("transformer.wte.weight", "lm_head.weight"):
            a, b = a[:50257], b[:50257]  # the padding rows come back as zeros
        assert torch.equal(a, b), k


def test_export_of_a_saved_gptlab_model_dir(tmp_path, make_gptlab):
    ours = make_gptlab(seed=9)
    save_model(ours, tmp_path / "m")
    model, _ = load_model(tmp_path / "m")
    out = hf.export_hf(model, tmp_path / "hf")
    assert hf.load_hf_dir(out).config.n_layer == 2


def test_export_replaces_an_earlier_export_but_not_other_dirs(tmp_path, make_gptlab, hf_gpt2_dir):
    out = hf.export_hf(make_gptlab(seed=1), tmp_path / "e")
    hf.export_hf(make_gptlab(seed=2), out)  # an earlier export is replaced
    assert torch.equal(hf.load_hf_dir(out).transformer.wte.weight[:50257],
                       make_gptlab(seed=2).transformer.wte.weight[:50257])
    other = tmp_path / "notes"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    with pytest.raises(UserError, match="refusing to overwrite"):
        hf.export_hf(make_gptlab(), other)
    assert (other / "keep.txt").read_text() == "mine"
    # nor a Hugging Face directory that gptlab did not write
    with pytest.raises(UserError, match="refusing to overwrite"):
        hf.export_hf(make_gptlab(), hf_gpt2_dir)
    assert (hf_gpt2_dir / "config.json").is_file()


def test_failed_export_leaves_nothing(tmp_path, make_gptlab, monkeypatch):
    out = hf.export_hf(make_gptlab(seed=1), tmp_path / "e")
    before = (out / "model.safetensors").read_bytes()

    def broken(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(hf, "_tokenizer_files", broken)
    with pytest.raises(OSError):
        hf.export_hf(make_gptlab(seed=2), out)
    assert (out / "model.safetensors").read_bytes() == before  # the old export is intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e"]
