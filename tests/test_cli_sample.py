"""`gptlab sample` and `gptlab export` through the real command line: in this process (`cli`), and
in a subprocess where the environment must be read at import time (the hub cache)."""

import json

import pytest
import torch

from gptlab import hf
from gptlab.checkpoint import load_model
from gptlab.generate import generate_ids
from gptlab.tokenizer import get_tokenizer


def assert_user_error(result, *needles):
    """Exit status 2, one line on stderr naming the problem, nothing on stdout, no traceback."""
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr and lines[0].startswith("gptlab ")
    for needle in needles:
        assert needle in lines[0], lines[0]
    assert result.stdout == ""


def test_sample_streams_prompt_and_continuation(cli, gptlab_model_dir):
    r = cli("sample", gptlab_model_dir, "--prompt", "Hello, I'm a language model,",
            "--max-new-tokens", "12", "--seed", "1")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("Hello, I'm a language model,") and r.stdout.endswith("\n")
    assert "tokens/s" in r.stderr and "Traceback" not in r.stderr
    # the same seed gives the same text
    again = cli("sample", gptlab_model_dir, "--prompt", "Hello, I'm a language model,",
                "--max-new-tokens", "12", "--seed", "1")
    assert again.stdout == r.stdout


def test_sample_json(cli, gptlab_model_dir, tmp_path):
    prompt_file = tmp_path / "prompt.txt"
    prompt_file.write_text("Once upon a time\n", encoding="utf-8")
    r = cli("sample", gptlab_model_dir, "--prompt", "The meaning of life is", "--prompt-file", prompt_file,
            "--num-samples", "3", "--max-new-tokens", "8", "--temperature", "0.8", "--top-p", "0.9",
            "--seed", "5", "--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)  # exactly one JSON object on stdout, nothing else
    assert set(doc) == {"model", "samples"} and doc["model"] == str(gptlab_model_dir)
    assert [s["prompt"] for s in doc["samples"]] == ["The meaning of life is"] * 3 + ["Once upon a time\n"] * 3
    tok = get_tokenizer()
    for s in doc["samples"]:
        assert set(s) == {"prompt", "text", "tokens"}
        assert 1 <= len(s["tokens"]) <= 8 and all(0 <= t < 50257 for t in s["tokens"])
        assert s["text"] == tok.decode([t for t in s["tokens"] if t != 50256])


def test_sample_greedy_matches_the_library(cli, gptlab_model_dir):
    r = cli("sample", gptlab_model_dir, "--prompt", "Hello world", "--temperature", "0",
            "--max-new-tokens", "10", "--json")
    assert r.returncode == 0, r.stderr
    model, _ = load_model(gptlab_model_dir)
    want = generate_ids(model, get_tokenizer().encode("Hello world"), max_new_tokens=10, temperature=0)
    assert json.loads(r.stdout)["samples"][0]["tokens"] == want[0]


def test_sample_several_samples_printed_as_they_complete(cli, gptlab_model_dir):
    r = cli("sample", gptlab_model_dir, "--num-samples", "2", "--max-new-tokens", "5", "--seed", "0")
    assert r.returncode == 0, r.stderr
    assert "--- sample 1/2 ---" in r.stdout and "--- sample 2/2 ---" in r.stdout
    assert "<|endoftext|>" not in r.stdout  # the default start token is not printed


def test_sample_long_prompt_warns_on_stderr(cli, gptlab_model_dir):
    r = cli("sample", gptlab_model_dir, "--prompt", " word" * 100, "--max-new-tokens", "3",
            "--temperature", "0", "--json")
    assert r.returncode == 0, r.stderr
    assert "warning: the prompt has 100 tokens, more than the context of 64; keeping its last 62" in r.stderr
    assert len(json.loads(r.stdout)["samples"][0]["tokens"]) == 3  # cropped to leave --max-new-tokens


def test_sample_from_the_hub_cache(gptlab_cli, tmp_path, make_gptlab):
    """A hub id goes through huggingface_hub.hf_hub_download; offline it finds the cached snapshot.
    A subprocess: huggingface_hub reads HF_HUB_CACHE and HF_HUB_OFFLINE when it is imported."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--someone--tiny-gpt2"
    snapshot = repo / "snapshots" / commit
    exported = hf.export_hf(make_gptlab(seed=3), tmp_path / "export")
    snapshot.mkdir(parents=True)
    for name in ("config.json", "model.safetensors"):
        (snapshot / name).write_bytes((exported / name).read_bytes())
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    env = {"HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    r = gptlab_cli("sample", "someone/tiny-gpt2", "--max-new-tokens", "4", "--temperature", "0", "--json", env=env)
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["model"] == "someone/tiny-gpt2" and len(doc["samples"][0]["tokens"]) >= 1
    r = gptlab_cli("sample", "someone/not-there", env=env)
    assert_user_error(r, "could not download 'someone/not-there'", "local directory")


def test_export_cli(cli, gptlab_model_dir, tmp_path):
    out = tmp_path / "hf-out"
    r = cli("export", gptlab_model_dir, "--out", out)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == str(out)
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(out).eval()
    ours, _ = load_model(gptlab_model_dir)
    x = torch.randint(0, 50257, (1, 16))
    with torch.no_grad():
        assert (ref(x).logits - ours(x)[0]).abs().max() <= 1e-4


@pytest.mark.parametrize("flags, needle", [
    (["--temperature", "-1"], "--temperature"),
    (["--temperature", "hot"], "--temperature"),
    (["--top-p", "0"], "--top-p"),
    (["--top-p", "1.5"], "--top-p"),
    (["--top-k", "-3"], "--top-k"),
    (["--num-samples", "0"], "--num-samples"),
    (["--max-new-tokens", "0"], "--max-new-tokens"),
    (["--seed", "x"], "--seed"),
])
def test_sample_bad_flag_values(cli, gptlab_model_dir, flags, needle):
    assert_user_error(cli("sample", gptlab_model_dir, *flags), needle)


def test_sample_missing_prompt_file(cli, gptlab_model_dir, tmp_path):
    assert_user_error(cli("sample", gptlab_model_dir, "--prompt-file", tmp_path / "nope.txt"),
                      "no such prompt file")


def test_missing_model_and_non_model_dirs(cli, tmp_path):
    assert_user_error(cli("sample", tmp_path / "missing"), "missing", "no such model directory")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert_user_error(cli("sample", empty), "not a model directory")
    (empty / "config.json").write_text('{"model_type": "bert"}')
    assert_user_error(cli("export", empty, "--out", tmp_path / "o"), "model_type 'bert' is not supported")


def test_export_errors(cli, gptlab_model_dir, tmp_path):
    assert_user_error(cli("export", gptlab_model_dir), "--out")
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("keep me")
    assert_user_error(cli("export", gptlab_model_dir, "--out", busy), "refusing to overwrite")
    assert (busy / "notes.txt").read_text() == "keep me"
