"""`gptlab prepare`: exact tokens, whole-document validation split, budgets, resume after a kill."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from conftest import run_gptlab
from gptlab.data import prepare as prep
from gptlab.data import shards as sh
from gptlab.data.sources import files_source, hub_source
from gptlab.errors import UserError
from gptlab.tokenizer import get_encoding

EOT = 50256
SRC = str(Path(__file__).resolve().parents[1] / "src")


def make_texts(n: int, seed: int = 0, max_words: int = 150) -> list[str]:
    rng = np.random.default_rng(seed)
    words = ["the", " king", "Hamlet", " ", "\n", "\n\n", "über", "日本語", "—", "<|endoftext|>", " 42",
             "  ", "!", "\t", " don't", "\r\n", "😀", "\u00a0"]
    return ["".join(rng.choice(words) for _ in range(int(rng.integers(0, max_words)))) for _ in range(n)]


def write_jsonl(path: Path, texts: list[str]) -> Path:
    with open(path, "w", encoding="utf-8") as f:
        for t in texts:
            f.write(json.dumps({"text": t}) + "\n")
    return path


def read_split(out: Path, split: str) -> np.ndarray:
    m = json.loads((out / "manifest.json").read_text())
    parts = [sh.read_tokens(out / s["file"]) for s in m["shards"] if s["split"] == split]
    return np.concatenate(parts) if parts else np.zeros(0, np.uint16)


def docs_of(stream: np.ndarray) -> list[list[int]]:
    """Split a token stream into documents at the EOT that opens each."""
    assert len(stream) == 0 or stream[0] == EOT
    starts = np.flatnonzero(stream == EOT).tolist() + [len(stream)]
    return [stream[a + 1: b].tolist() for a, b in zip(starts, starts[1:])]


def run(tmp_path: Path, texts: list[str], out: str = "ds", **kw) -> tuple[Path, dict]:
    corpus = tmp_path / "corpus.jsonl"
    if not corpus.exists():
        write_jsonl(corpus, texts)
    kw.setdefault("workers", 1)
    kw.setdefault("progress", False)
    result = prep.prepare(files_source([str(corpus)]), tmp_path / out, **kw)
    return tmp_path / out, result


def test_tokens_equal_direct_tiktoken(tmp_path):
    texts = make_texts(60)
    out, result = run(tmp_path, texts, shard_tokens=500)
    enc = get_encoding()
    got = docs_of(read_split(out, "val")) + docs_of(read_split(out, "train"))
    assert got == [enc.encode_ordinary(t) for t in texts]  # exactly, document by document
    assert result["documents"] == 60
    shards = json.loads((out / "manifest.json").read_text())["shards"]
    # every shard but the last of its split is full
    for split in ("val", "train"):
        sizes = [s["tokens"] for s in shards if s["split"] == split]
        assert all(n == 500 for n in sizes[:-1]) and 0 < sizes[-1] <= 500


def test_encode_texts_matches_encode_ordinary():
    texts = ["", "a", "<|endoftext|>", "\ud83d lone surrogate", "x" * 5000]
    tokens, lengths = prep.encode_texts(texts)
    enc = get_encoding()
    want = [[EOT] + enc.encode_ordinary(t) for t in texts]
    assert lengths.tolist() == [len(w) for w in want]
    assert tokens.tolist() == sum(want, [])


def test_val_split_is_whole_leading_documents(tmp_path):
    texts = make_texts(450, seed=1, max_words=30)
    out, result = run(tmp_path, texts, shard_tokens=100)
    enc = get_encoding()
    m = json.loads((out / "manifest.json").read_text())
    n_val = m["val"]["max_docs"]
    assert n_val == 2  # round(0.5% of 450)
    assert docs_of(read_split(out, "val")) == [enc.encode_ordinary(t) for t in texts[:n_val]]
    assert docs_of(read_split(out, "train")) == [enc.encode_ordinary(t) for t in texts[n_val:]]
    assert m["splits"]["val"]["documents"] == n_val
    # val shards come first in the numbering; the split closes at a document boundary
    names = [s["file"] for s in m["shards"]]
    assert names[0] == "files_val_000000.bin" and all("_train_" in n for n in names[m["splits"]["val"]["shards"]:])


def test_val_plan():
    plan = prep.val_plan
    assert plan(42, budget=None, val_fraction=None, val_tokens=None) == {"max_docs": 1, "max_tokens": 10_000_000}
    assert plan(1, budget=None, val_fraction=None, val_tokens=None)["max_docs"] == 0
    assert plan(2, budget=None, val_fraction=None, val_tokens=None)["max_docs"] == 1
    assert plan(10_000, budget=None, val_fraction=None, val_tokens=None)["max_docs"] == 50
    assert plan(100, budget=None, val_fraction=0.1, val_tokens=None) == {"max_docs": 10, "max_tokens": None}
    assert plan(100, budget=None, val_fraction=0.0, val_tokens=None)["max_docs"] == 0
    assert plan(3, budget=None, val_fraction=0.9, val_tokens=None)["max_docs"] == 2  # a train document stays
    assert plan(100, budget=None, val_fraction=None, val_tokens=5000) == {"max_docs": 99, "max_tokens": 5000}
    assert plan(None, budget=None, val_fraction=None, val_tokens=None) == {"max_docs": None, "max_tokens": 10_000_000}
    assert plan(None, budget=5 * 10**9, val_fraction=None, val_tokens=None)["max_tokens"] == 10_000_000
    assert plan(None, budget=10**6, val_fraction=None, val_tokens=None)["max_tokens"] == 5000
    assert plan(None, budget=10**6, val_fraction=0.01, val_tokens=None)["max_tokens"] == 10_000
    with pytest.raises(UserError, match="--val-fraction needs"):
        plan(None, budget=None, val_fraction=0.01, val_tokens=None)


def test_val_tokens_cap_and_budget(tmp_path):
    texts = make_texts(80, seed=2)
    out, _ = run(tmp_path, texts, val_tokens=300, tokens=2000, shard_tokens=10**6)
    enc = get_encoding()
    lens = [1 + len(enc.encode_ordinary(t)) for t in texts]
    cum = np.cumsum(lens)
    n_val = int(np.searchsorted(cum, 300, side="left")) + 1  # val takes documents until it holds 300 tokens
    n_all = int(np.searchsorted(cum, 2000, side="left")) + 1  # stop after the document meeting the budget
    assert len(docs_of(read_split(out, "val"))) == n_val
    assert len(docs_of(read_split(out, "val"))) + len(docs_of(read_split(out, "train"))) == n_all
    assert len(read_split(out, "val")) + len(read_split(out, "train")) == cum[n_all - 1] >= 2000


def test_max_docs(tmp_path):
    texts = make_texts(30, seed=3)
    out, result = run(tmp_path, texts, max_docs=7)
    assert result["documents"] == 7
    assert len(docs_of(read_split(out, "val")) + docs_of(read_split(out, "train"))) == 7


def test_finished_and_conflicting_directories(tmp_path):
    texts = make_texts(20, seed=4)
    out, _ = run(tmp_path, texts, shard_tokens=200)
    before = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.iterdir()}
    _, again = run(tmp_path, texts, shard_tokens=200)
    assert again["status"] == "done"
    assert {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.iterdir()} == before
    with pytest.raises(UserError, match="different prepare.shard_tokens"):
        run(tmp_path, texts, shard_tokens=300)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "x_train_000000.bin").write_bytes(b"keep me")
    with pytest.raises(UserError, match="already holds .bin files"):
        run(tmp_path, texts, out="foreign")
    assert (foreign / "x_train_000000.bin").read_bytes() == b"keep me"


class _Interrupt(Exception):
    pass


@pytest.mark.parametrize("event", ["shard", "progress"])
@pytest.mark.parametrize("shard_tokens", [400, 37])  # 37: documents span several shards
def test_interrupted_prepare_resumes_identically(tmp_path, monkeypatch, event, shard_tokens):
    """Stop after shard k (file renamed but progress not yet saved, or both), rerun, stop again right
    after the next shard (inside the same document when they are short), rerun: the same bytes."""
    texts = make_texts(120, seed=5)
    ref, _ = run(tmp_path, texts, out="ref", shard_tokens=shard_tokens)
    k = 5 if shard_tokens == 400 else 40
    for stop in (k, k + 1):
        def hook(ev, n, stop=stop):
            if ev == event and n == stop:
                raise _Interrupt

        monkeypatch.setattr(prep, "_kill_hook", hook)
        with pytest.raises(_Interrupt):
            run(tmp_path, texts, out="part", shard_tokens=shard_tokens)
        assert not (tmp_path / "part" / "manifest.json").exists()
        progress = json.loads((tmp_path / "part" / "progress.json").read_text())
        if shard_tokens == 37 and event == "progress":
            assert progress["skip_tokens"] > 0  # stopped inside a document: the rerun must drop its head
    with pytest.raises(UserError, match="unfinished prepare"):
        sh.open_dataset(tmp_path / "part")
    with pytest.raises(UserError, match="unfinished prepare with different"):
        run(tmp_path, texts, out="part", shard_tokens=500)
    monkeypatch.setattr(prep, "_kill_hook", lambda ev, n: None)
    _, result = run(tmp_path, texts, out="part", shard_tokens=shard_tokens)
    assert result["status"] == "resumed" and result["resumed_from_doc"] > 0
    assert result["tokenized_documents"] < 120  # the documents of complete shards were skipped
    assert sorted(p.name for p in (tmp_path / "part").iterdir()) == sorted(p.name for p in ref.iterdir())
    for p in ref.iterdir():
        assert (tmp_path / "part" / p.name).read_bytes() == p.read_bytes(), p.name


def test_a_continued_prepare_removes_the_temporaries_a_kill_left(tmp_path, monkeypatch):
    """Shards and progress being written when the prepare died, in atomic's one spelling and in
    the spellings of earlier versions: gone when it continues; the result is the same bytes."""
    texts = make_texts(120, seed=5)
    ref, _ = run(tmp_path, texts, out="ref", shard_tokens=400)

    def hook(ev, n):
        if ev == "progress" and n == 3:
            raise _Interrupt

    monkeypatch.setattr(prep, "_kill_hook", hook)
    with pytest.raises(_Interrupt):
        run(tmp_path, texts, out="part", shard_tokens=400)
    part = tmp_path / "part"
    for name in (".ds_train_000004.bin.tmp-99999", ".progress.json.tmp-99999",  # the one spelling
                 "ds_train_000004.bin.tmp", "progress.json.tmp"):  # as earlier versions spelt them
        (part / name).write_bytes(b"half")
    monkeypatch.setattr(prep, "_kill_hook", lambda ev, n: None)
    _, result = run(tmp_path, texts, out="part", shard_tokens=400)
    assert result["status"] == "resumed"
    assert sorted(p.name for p in part.iterdir()) == sorted(p.name for p in ref.iterdir())


def test_sigkilled_prepare_resumes_identically(tmp_path):
    """A real SIGKILL (test hook) in a subprocess with worker processes; the rerun gives the same bytes."""
    corpus = write_jsonl(tmp_path / "c.jsonl", make_texts(300, seed=6))
    # the reference: in this process, one worker (the output does not depend on the worker count)
    prep.prepare(files_source([str(corpus)]), tmp_path / "ref", shard_tokens=2000, workers=1, progress=False)
    common = ["prepare", "files", str(corpus), "--shard-tokens", "2K", "--workers", "2", "--no-progress"]
    r = run_gptlab(*common, "--out", str(tmp_path / "part"), env={prep.KILL_ENV: "progress:2"})
    assert r.returncode == -9, r.stderr
    assert len(list((tmp_path / "part").glob("*.bin"))) == 2
    r = run_gptlab(*common, "--out", str(tmp_path / "part"))
    assert r.returncode == 0 and "resum" in r.stdout, r.stdout + r.stderr
    ref = sorted((tmp_path / "ref").iterdir())
    assert [p.name for p in ref] == sorted(p.name for p in (tmp_path / "part").iterdir())
    for p in ref:
        assert (tmp_path / "part" / p.name).read_bytes() == p.read_bytes(), p.name


def test_prepare_does_not_import_torch(tmp_path):
    corpus = write_jsonl(tmp_path / "c.jsonl", make_texts(10, seed=7))
    code = (
        "import sys; from gptlab.cli import main\n"
        f"assert main(['prepare', 'files', {str(corpus)!r}, '--out', {str(tmp_path / 'o')!r}, '--no-progress']) == 0\n"
        f"assert main(['data', 'info', {str(tmp_path / 'o')!r}]) == 0\n"
        f"assert main(['data', 'verify', {str(tmp_path / 'o')!r}, '--no-progress']) == 0\n"
        "bad = [m for m in ('torch', 'datasets', 'transformers') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    env = dict(os.environ, PYTHONPATH=SRC + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr


def test_cli_shakespeare_offline_default_out(tmp_path):
    r = run_gptlab("prepare", "shakespeare", "--max-docs", "3", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    m = json.loads((tmp_path / "data" / "shakespeare" / "manifest.json").read_text())
    assert m["source"]["name"] == "shakespeare" and m["documents"] == 3
    assert [s["split"] for s in m["shards"]] == ["val", "train"]


@pytest.mark.parametrize("args, message", [
    (["files"], "at least one PATH"),
    (["files", "missing.jsonl"], "no such file"),
    (["files", "c.jsonl", "--val-fraction", "1.5"], "--val-fraction"),
    (["fineweb-edu", "--val-fraction", "0.01"], "--val-fraction needs"),
])
def test_cli_user_errors(cli, tmp_path, args, message):
    write_jsonl(tmp_path / "c.jsonl", ["x"])
    r = cli("prepare", *args, "--out", str(tmp_path / "o"), cwd=tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and message in r.stderr, r.stderr


def test_hub_stream_with_budget(tmp_path, monkeypatch):
    """fineweb-edu through a stand-in `datasets`: stops at the token budget; val by tokens."""
    texts = make_texts(500, seed=8)
    served = []

    def load_dataset(path, name=None, split=None, streaming=False):
        assert (path, name, split, streaming) == ("HuggingFaceFW/fineweb-edu", "sample-10BT", "train", True)

        def rows():
            for t in texts:
                served.append(t)
                yield {"text": t}
        return rows()

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    monkeypatch.setattr(prep, "BATCH_DOCS", 16)  # documents are read a batch at a time
    out = tmp_path / "fw"
    result = prep.prepare(hub_source("fineweb-edu"), out, tokens=3000, shard_tokens=1000, workers=1, progress=False)
    m = json.loads((out / "manifest.json").read_text())
    assert m["val"] == {"max_docs": None, "max_tokens": 15}  # 0.5% of the budget
    assert 3000 <= result["tokens"] < 3000 + 1000 and result["documents"] < 500
    enc = get_encoding()
    got = docs_of(read_split(out, "val")) + docs_of(read_split(out, "train"))
    assert got == [enc.encode_ordinary(t) for t in texts[: result["documents"]]]
    assert m["shards"][0]["file"].startswith("fineweb_edu_val_")
    assert len(served) <= result["documents"] + 16  # the stream stopped at the budget (one batch read ahead)


def test_hub_unreachable_leaves_no_marker(tmp_path, monkeypatch):
    def load_dataset(*args, **kwargs):
        raise ConnectionError("Couldn't reach the hub")

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    with pytest.raises(UserError, match="cannot open HuggingFaceFW/fineweb"):
        prep.prepare(hub_source("fineweb"), tmp_path / "fw", tokens=1000, workers=1, progress=False)
    assert not (tmp_path / "fw").exists()  # no unfinished-prepare directory to trip over later
