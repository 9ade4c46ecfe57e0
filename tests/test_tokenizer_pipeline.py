"""A trained tokenizer through the whole pipeline: prepare --tokenizer records it, a fresh model's
vocabulary follows it, checkpoints carry it, sample decodes with it, and the Hugging Face export
(AutoTokenizer + GPT2LMHeadModel) reproduces `gptlab sample --temperature 0` token for token.
Mismatched data and models are refused in one line. Data: the embedded Shakespeare."""

from __future__ import annotations

import json

import numpy as np
import pytest

from gptlab import tokenizer as tk
from gptlab.data import shards as sh
from gptlab.data.sources import shakespeare_source
from gptlab.rundir import RunDir
from gptlab.tokenizer_train import train_tokenizer

TRAIN = ["--model", "tiny", "--n-layer", "1", "--n-head", "2", "--n-embd", "32", "--seq-len", "32",
         "--batch-size", "4", "--total-batch-tokens", "256", "--max-steps", "6", "--lr", "1e-2", "--warmup-steps", "2",
         "--eval-every", "0", "--sample-tokens", "0", "--checkpoint-every", "0", "--device", "cpu"]
RUN_FLAGS = TRAIN[10:]  # without the shape (a pretrained model decides it)


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("tok") / "shk500"
    train_tokenizer(shakespeare_source(), out, 500, max_docs=4, progress=False)
    return out


@pytest.fixture(scope="module")
def prepared(tok_dir, tmp_path_factory):
    from gptlab.data.prepare import prepare

    out = tmp_path_factory.mktemp("data") / "shk"
    prepare(shakespeare_source(), out, max_docs=3, workers=2, progress=False, tokenizer=str(tok_dir))
    return out


def test_prepare_records_and_carries_the_tokenizer(prepared, tok_dir):
    tok = tk.load_tokenizer(tok_dir)
    m = sh.read_manifest(prepared)
    info = m["tokenizer"]
    assert info["name"] == "shk500" and info["eot"] == 500 and info["vocab_size"] == 501
    assert info["sha256"] == tk.read_tokenizer_manifest(tok_dir)["tokenizer_sha256"]
    assert (prepared / "tokenizer" / "vocab.json").read_bytes() == (tok_dir / "vocab.json").read_bytes()
    assert tk.same_tokenizer(tk.dataset_tokenizer(prepared), tok)
    # the shards are exactly the documents, each after the trained tokenizer's own end-of-text
    docs = list(shakespeare_source().documents(0))[:3]
    want = np.concatenate([np.asarray([500] + tok.encode(d, allow_special=False)) for d in docs])
    got = np.concatenate([sh.read_tokens(prepared / s["file"]) for s in m["shards"]])
    assert np.array_equal(got, want)
    assert m["documents"] == 3 and int(got.max()) <= 500


def test_prepare_cli_with_another_tokenizer_refused_on_a_finished_dir(cli, prepared, tmp_path):
    r = cli("prepare", "shakespeare", "--max-docs", "3", "--out", str(prepared), "--no-progress", "--workers", "1")
    assert r.returncode == 2 and "tokenizer" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    r = cli("prepare", "shakespeare", "--tokenizer", str(tmp_path / "none"), "--out", str(tmp_path / "d"))
    assert r.returncode == 2 and "no such tokenizer directory" in r.stderr


@pytest.fixture(scope="module")
def run(prepared, tmp_path_factory):
    from gptlab.config import resolve_train_config
    from gptlab.train import train

    out = tmp_path_factory.mktemp("runs") / "r"
    names = [a.lstrip("-").replace("-", "_") for a in TRAIN[0::2]]
    flags = dict(zip(names, TRAIN[1::2]))
    flags = {k: (v if k in ("model", "device") else float(v) if k == "lr" else int(v)) for k, v in flags.items()}
    train(resolve_train_config({**flags, "data": str(prepared), "out": str(out)}))
    return out


def test_model_vocabulary_follows_the_data(run):
    ckpt = RunDir(run).latest_checkpoint()
    cfg = json.loads((ckpt / "config.json").read_text())
    assert cfg["vocab_size"] == 501 and cfg["vocab_multiple"] == 64  # padded to 512 rows
    assert (ckpt / "tokenizer" / "merges.txt").is_file()  # the checkpoint carries its tokenizer
    from gptlab.checkpoint import load_model

    model, _ = load_model(str(run))
    assert model.transformer.wte.weight.shape[0] == 512
    assert tk.model_tokenizer(model).name == "shk500"


def test_sample_and_export_agree_token_for_token(cli, run, tmp_path):
    import torch
    from transformers import AutoTokenizer, GPT2LMHeadModel

    prompt = "To be, or not to be"
    r = cli("sample", str(run), "--prompt", prompt, "--temperature", "0", "--max-new-tokens", "12", "--json")
    assert r.returncode == 0, r.stderr
    sample = json.loads(r.stdout)["samples"][0]
    tok = tk.load_tokenizer(RunDir(run).latest_checkpoint() / "tokenizer")
    assert all(t < 501 for t in sample["tokens"])
    assert sample["text"] == tok.decode([t for t in sample["tokens"] if t != tok.eot])

    hf_dir = tmp_path / "hf"
    assert cli("export", str(run), "--out", str(hf_dir)).returncode == 0
    hf_tok = AutoTokenizer.from_pretrained(str(hf_dir))
    model = GPT2LMHeadModel.from_pretrained(str(hf_dir)).eval()
    ids = hf_tok(prompt, return_tensors="pt")["input_ids"]
    assert ids[0].tolist() == tok.encode(prompt)  # the export's tokenizer is the trained one
    assert model.config.eos_token_id == 500 and model.config.vocab_size == 501
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=12, do_sample=False, eos_token_id=500, pad_token_id=500)
    new = out[0, ids.shape[1]:].tolist()
    assert new == sample["tokens"]
    assert hf_tok.decode(new, skip_special_tokens=True) == sample["text"]


def test_mismatched_model_and_data_refused(cli, run, prepared, gptlab_model_dir, tmp_path):
    from conftest import make_toy_data

    # a GPT-2-vocabulary model on data of the trained tokenizer
    r = cli("train", *RUN_FLAGS, "--data", str(prepared), "--init-from", str(gptlab_model_dir), "--seq-len", "32",
            "--out", str(tmp_path / "a"))
    assert r.returncode == 2 and "tokenized with shk500" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    # a model of the trained tokenizer on GPT-2 data
    gpt2_data = make_toy_data(tmp_path / "g", 5_000, 20_000)
    r = cli("train", *RUN_FLAGS, "--data", str(gpt2_data), "--init-from", str(run), "--out", str(tmp_path / "b"))
    assert r.returncode == 2 and "tokenized with gpt2" in r.stderr and "shk500" in r.stderr


def test_data_verify_counts_the_trained_end_of_text(cli, prepared):
    r = cli("data", "verify", str(prepared), "--no-progress")
    assert r.returncode == 0, r.stderr
    r = cli("data", "info", str(prepared))
    assert "tokenizer: shk500" in r.stdout


def _completion_predictions(model, tok, items) -> tuple[list[int], list[int]]:
    """build-nanogpt's completion scoring, recomputed here with plain forwards in tok's ids: for
    each item, the ending of lowest summed and lowest mean loss over the ending's own tokens."""
    import torch
    import torch.nn.functional as F

    acc, norm = [], []
    with torch.no_grad():
        for it in items:
            ctx = tok.encode(it["ctx"], allow_special=False)
            sums, means = [], []
            for e in it["endings"]:
                cont = tok.encode(" " + e, allow_special=False)
                ids = torch.tensor([ctx + cont])
                logits, _ = model(ids[:, :-1])
                losses = F.cross_entropy(logits[0, -len(cont):].float(), ids[0, -len(cont):], reduction="none")
                sums.append(float(losses.sum()))
                means.append(float(losses.mean()))
            acc.append(min(range(4), key=sums.__getitem__))
            norm.append(min(range(4), key=means.__getitem__))
    return acc, norm


def short_items(n: int, seed: int = 0) -> list[dict]:
    """HellaSwag items short enough for a 32-token context in a 500-token vocabulary."""
    import random

    rng = random.Random(seed)
    words = "the king my lord love and thou art to be not what shall I say".split()
    out = []
    for _ in range(n):
        a, b = " ".join(rng.choices(words, k=3)) + ",", rng.choice(words)
        ends = [" ".join(rng.choices(words, k=rng.randint(1, 3))) + "." for _ in range(4)]
        out.append({"activity_label": "Speaking", "ctx_a": a, "ctx_b": b, "ctx": a + " " + b,
                    "endings": ends, "label": rng.randint(0, 3)})
    return out


def test_hellaswag_and_harness_tasks_tokenize_with_the_models_own_tokenizer(cli, run, tmp_path):
    """Before: refused in one line ("GPT-2's BPE only"). Now HellaSwag is rendered in the trained
    tokenizer's ids and scores equal a plain recomputation with that tokenizer."""
    from gptlab.checkpoint import load_model
    from gptlab.harness import GptlabLM

    items = short_items(8, seed=5)
    hs = tmp_path / "hs.jsonl"
    hs.write_text("".join(json.dumps(it) + "\n" for it in items), encoding="utf-8")
    r = cli("eval", str(run), "--hellaswag-file", str(hs), "--device", "cpu", "--json")
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)["hellaswag"]["completion"]
    model, _ = load_model(str(run))
    model.eval()
    tok = tk.model_tokenizer(model)
    acc, norm = _completion_predictions(model, tok, items)
    labels = [it["label"] for it in items]
    assert got["n"] == 8
    assert got["acc"] == pytest.approx(sum(a == y for a, y in zip(acc, labels)) / 8)
    assert got["acc_norm"] == pytest.approx(sum(a == y for a, y in zip(norm, labels)) / 8)
    # the harness model speaks the same tokenizer: its ids, its end-of-text, its name
    lm = GptlabLM(model=model, device="cpu", quiet=True)
    assert lm.tok_encode("To be, or not") == tok.encode("To be, or not", allow_special=False)
    assert lm.eot_token_id == 500 and lm.prefix_token_id == 500 and lm.tokenizer_name == "shk500"


def test_hellaswag_during_training_with_a_trained_tokenizer(cli, prepared, tmp_path):
    from conftest import read_metrics

    hs = tmp_path / "hs.jsonl"
    hs.write_text("".join(json.dumps(it) + "\n" for it in short_items(4)), encoding="utf-8")
    flags = [a if a != "0" or TRAIN[i - 1] != "--eval-every" else "3" for i, a in enumerate(TRAIN)]
    r = cli("train", *flags, "--data", str(prepared), "--hellaswag", "--hellaswag-file", str(hs), "--out", str(tmp_path / "h"))
    assert r.returncode == 0, r.stderr
    recs = read_metrics(tmp_path / "h", "hellaswag")
    assert recs and all(rec["completion"]["n"] == 4 for rec in recs)

