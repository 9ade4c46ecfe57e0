"""Bits per byte: the summed val loss in bits over the UTF-8 bytes of the scored tokens, in val
records, `gptlab eval` and the plots. Data: the embedded Shakespeare, prepared here."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from conftest import random_gptlab
from gptlab import tokenizer as tk
from gptlab.data import shards as sh
from gptlab.data.prepare import prepare
from gptlab.data.sources import Source, shakespeare_source
from gptlab.evaluate import evaluate_val_loss
from gptlab.tokenizer_train import train_tokenizer

T = 64


def _docs(n: int = 3) -> list[str]:
    return list(shakespeare_source().documents(0))[:n]


def _source(docs) -> Source:
    return Source("shk3", {"n": len(docs)}, lambda: len(docs), lambda start: iter(docs[start:]))


@pytest.fixture(scope="module")
def gpt2_data(tmp_path_factory):
    out = tmp_path_factory.mktemp("bpb") / "gpt2"
    prepare(_source(_docs()), out, workers=1, progress=False, val_fraction=0.34)
    return out


@pytest.fixture(scope="module")
def bytes_tok(tmp_path_factory):
    out = tmp_path_factory.mktemp("bpb") / "bytes"
    train_tokenizer(_source(_docs(1)), out, 256, progress=False)
    return out


@pytest.fixture(scope="module")
def bytes_data(tmp_path_factory, bytes_tok):
    out = tmp_path_factory.mktemp("bpb") / "bytes-data"
    prepare(_source(_docs()), out, workers=1, progress=False, val_fraction=0.34, tokenizer=str(bytes_tok))
    return out


def _val_tokens(data) -> np.ndarray:
    m = sh.read_manifest(data)
    return np.concatenate([sh.read_tokens(data / s["file"]) for s in m["shards"] if s["split"] == "val"])


def test_gpt2_bpb_is_loss_over_ln2_times_tokens_per_byte(gpt2_data):
    model = random_gptlab(seed=3, seq_len=T)
    tok = tk.get_tokenizer()
    res = evaluate_val_loss(model, gpt2_data, device="cpu", seq_len=T, batch_size=4, max_tokens=20 * T, tokenizer=tok)
    # independently: the 20 windows' targets are tokens 1 .. 20*T of the val stream
    targets = _val_tokens(gpt2_data)[1: 20 * T + 1]
    nbytes = len(tok.decode_bytes([t for t in targets if t != tok.eot]))
    assert res["tokens"] == 20 * T and res["bytes"] == nbytes
    assert res["bits_per_byte"] == pytest.approx(res["loss"] / math.log(2) * res["tokens"] / nbytes, rel=1e-9)
    # and the loss itself, summed by hand from the logits
    x = torch.from_numpy(_val_tokens(gpt2_data)[: 20 * T + 1].astype(np.int64))
    with torch.no_grad():
        logits, _ = model(x[:-1].view(20, T), x[1:].view(20, T))
    nats = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)).double(), x[1:], reduction="sum")
    assert res["bits_per_byte"] == pytest.approx(float(nats) / math.log(2) / nbytes, rel=1e-6)
    # no tokenizer given: no bytes counted, nothing else changes
    plain = evaluate_val_loss(model, gpt2_data, device="cpu", seq_len=T, batch_size=4, max_tokens=20 * T)
    assert set(plain) == {"loss", "perplexity", "tokens"} and plain["loss"] == pytest.approx(res["loss"])


def test_bytes_are_the_val_texts_bytes_whatever_the_tokenizer(gpt2_data, bytes_data):
    """The same val documents tokenized two ways: the byte count over the whole val split is their
    UTF-8 size both times, so bits per byte measure the same text."""
    val_docs = _docs()[:1]
    want = sum(len(d.encode()) for d in val_docs)
    for data in (gpt2_data, bytes_data):
        tok = tk.dataset_tokenizer(data)
        lengths = np.asarray(tk.token_byte_lengths(tok))
        assert int(lengths[_val_tokens(data)].sum()) == want
    assert tk.dataset_tokenizer(bytes_data).vocab_size == 257


def test_byte_level_bpb_is_loss_per_byte(bytes_data):
    """With one token per byte, bits per byte is the per-token loss in bits, up to the EOT targets."""
    tok = tk.dataset_tokenizer(bytes_data)
    model = random_gptlab(seed=4, seq_len=T, vocab_size=257)
    tk.set_model_tokenizer(model, tok)
    res = evaluate_val_loss(model, bytes_data, device="cpu", seq_len=T, batch_size=8, max_tokens=30 * T,
                            tokenizer=tk.val_tokenizer(model, bytes_data))
    targets = _val_tokens(bytes_data)[1: 30 * T + 1]
    assert res["bytes"] == int(np.count_nonzero(targets != tok.eot))
    assert res["bits_per_byte"] == pytest.approx(res["loss"] / math.log(2) * res["tokens"] / res["bytes"], rel=1e-9)


def test_val_tokenizer_refuses_other_data(gpt2_data, bytes_data):
    from gptlab.errors import UserError

    model = random_gptlab(seed=4, seq_len=T)  # GPT-2's vocabulary
    assert tk.val_tokenizer(model, gpt2_data) is tk.get_tokenizer()
    with pytest.raises(UserError, match="tokenized with bytes"):
        tk.val_tokenizer(model, bytes_data)


def test_val_record_and_eval_agree(cli, bytes_data, tmp_path):
    """The training run's val record and `gptlab eval --val` score the same model on the same split
    the same way: one bits-per-byte number."""
    from conftest import read_metrics

    run = tmp_path / "run"
    r = cli("train", "--model", "tiny", "--n-layer", "1", "--n-head", "2", "--n-embd", "32", "--seq-len", str(T),
            "--data", str(bytes_data), "--batch-size", "4", "--total-batch-tokens", str(4 * T), "--max-steps", "4",
            "--eval-every", "4", "--eval-tokens", str(16 * T), "--sample-tokens", "0", "--checkpoint-every", "0",
            "--device", "cpu", "--out", str(run))
    assert r.returncode == 0, r.stderr
    rec = read_metrics(run, "val")[-1]
    assert 0 < rec["bits_per_byte"] < 9  # a byte-level model: about log2(257) at the start
    assert "bits per byte" in r.stderr
    r = cli("eval", str(run), "--val", str(bytes_data), "--val-tokens", str(16 * T), "--batch-size", "4", "--json",
            "--device", "cpu")
    assert r.returncode == 0, r.stderr
    val = json.loads(r.stdout)["val"]
    assert val["bits_per_byte"] == pytest.approx(rec["bits_per_byte"], rel=1e-6)
    assert val["loss"] == pytest.approx(rec["loss"], rel=1e-6)
    r = cli("eval", str(run), "--val", str(bytes_data), "--val-tokens", str(16 * T), "--device", "cpu")
    assert "bits per byte" in r.stdout
    # the plot overlays runs by bits per byte
    r = cli("plot", str(run), str(run), "--out", str(tmp_path / "plots"))
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "plots" / "bpb.png").is_file()


def test_eval_refuses_data_of_another_tokenizer(cli, gptlab_model_dir, bytes_data):
    r = cli("eval", str(gptlab_model_dir), "--val", str(bytes_data), "--device", "cpu")
    assert r.returncode == 2 and "tokenized with bytes" in r.stderr and len(r.stderr.strip().splitlines()) == 1
