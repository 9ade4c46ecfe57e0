"""Shard bytes, manifests, open/verify, and `gptlab data` through the CLI."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from gptlab.atomic import sha256_file
from gptlab.data import shards as sh
from gptlab.data.prepare import prepare
from gptlab.data.sources import files_source
from gptlab.errors import UserError


def assert_user_error(r, *fragments: str) -> None:
    """r: what conftest's cli (or run_gptlab) returned."""
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    for f in fragments:
        assert f in lines[0], lines[0]


def test_shard_round_trip_and_layout(tmp_path):
    tokens = np.array([50256, 0, 1, 65535, 31373, 995], dtype=np.uint16)
    path = tmp_path / "x_train_000001.bin"
    digest = sh.write_shard(path, tokens)
    raw = path.read_bytes()
    assert len(raw) == 1024 + 2 * len(tokens)
    header = np.frombuffer(raw[:1024], dtype="<i4")
    assert header[0] == 20240520 and header[1] == 1 and header[2] == len(tokens)
    assert not header[3:].any()
    assert raw[1024:] == tokens.astype("<u2").tobytes()
    assert digest == hashlib.sha256(raw).hexdigest() == sha256_file(path)
    assert sh.read_header(path) == len(tokens)
    np.testing.assert_array_equal(sh.read_tokens(path), tokens)
    assert list(tmp_path.iterdir()) == [path]  # no temporary file left


def test_empty_shard(tmp_path):
    path = tmp_path / "e_val_000000.bin"
    sh.write_shard(path, np.zeros(0, dtype=np.uint16))
    assert sh.read_header(path) == 0
    assert len(sh.open_tokens(path)) == 0


def _header(magic=20240520, version=1, n=3) -> bytes:
    h = np.zeros(256, dtype="<i4")
    h[:3] = magic, version, n
    return h.tobytes()


@pytest.mark.parametrize("content, message", [
    (_header(magic=1234) + b"\0" * 6, "bad magic"),
    (_header(version=2) + b"\0" * 6, "unsupported version"),
    (_header(n=3) + b"\0" * 4, "truncated"),
    (_header(n=3) + b"\0" * 8, "truncated"),
    (b"\0" * 100, "truncated"),
])
def test_bad_shards(tmp_path, content, message):
    path = tmp_path / "bad_train_000000.bin"
    path.write_bytes(content)
    with pytest.raises(UserError, match=message):
        sh.read_header(path)
    with pytest.raises(UserError, match=message):
        sh.open_dataset(tmp_path)


def test_split_from_name():
    assert sh.split_from_name("fineweb_val_000000.bin") == "val"
    assert sh.split_from_name("fineweb_train_000001.bin") == "train"
    assert sh.split_from_name("edufineweb_val_000000.bin") == "val"
    assert sh.split_from_name("tiny_shakespeare_val.bin") == "val"
    assert sh.split_from_name("trainset.bin") == "train"
    assert sh.split_from_name("shard_000.bin") is None


def test_open_dataset_errors(tmp_path):
    with pytest.raises(UserError, match="no such directory"):
        sh.open_dataset(tmp_path / "missing")
    with pytest.raises(UserError, match="no token shards"):
        sh.open_dataset(tmp_path)
    (tmp_path / "progress.json").write_text("{}")
    with pytest.raises(UserError, match="unfinished prepare"):
        sh.open_dataset(tmp_path)


def test_llmc_directory_without_manifest(tmp_path):
    rng = np.random.default_rng(0)
    sh.write_shard(tmp_path / "fineweb_val_000000.bin", rng.integers(0, 50257, 100).astype(np.uint16))
    sh.write_shard(tmp_path / "fineweb_train_000001.bin", rng.integers(0, 50257, 300).astype(np.uint16))
    sh.write_shard(tmp_path / "fineweb_train_000002.bin", rng.integers(0, 50257, 200).astype(np.uint16))
    (tmp_path / "README.txt").write_text("not a shard")
    ds = sh.open_dataset(tmp_path)
    assert ds.manifest is None
    assert [s.tokens for s in ds.split("train")] == [300, 200]
    assert [s.tokens for s in ds.split("val")] == [100]
    summary = sh.dataset_summary(tmp_path)
    assert summary["splits"]["train"] == {"shards": 2, "tokens": 500, "documents": None}
    assert sh.verify_dataset(tmp_path, progress=False)["hashed"] is False


def make_corpus(tmp_path: Path, n_docs: int = 20) -> Path:
    rng = np.random.default_rng(1)
    words = ["the", "king", "Hamlet", " ", "\n", "über", "日本", "—", "<|endoftext|>", "42", "  ", "!"]
    path = tmp_path / "corpus.jsonl"
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n_docs):
            text = "".join(rng.choice(words) for _ in range(int(rng.integers(1, 120))))
            f.write(json.dumps({"text": text, "id": i}) + "\n")
    return path


def prepared(tmp_path: Path, **kw) -> Path:
    out = tmp_path / "ds"
    prepare(files_source([str(make_corpus(tmp_path))]), out, shard_tokens=kw.pop("shard_tokens", 300),
            workers=1, progress=False, **kw)
    return out


def test_manifest_hashes_and_counts(tmp_path):
    out = prepared(tmp_path)
    m = json.loads((out / "manifest.json").read_text())
    assert m["format"] == sh.FORMAT and m["format_version"] == sh.FORMAT_VERSION
    assert m["tokenizer"]["name"] == "gpt2" and set(m["tokenizer"]["vocab_hashes"]) == {"vocab.bpe", "encoder.json"}
    assert m["source"]["name"] == "files" and m["source"]["text_field"] == "text"
    files = sorted(p.name for p in out.glob("*.bin"))
    assert sorted(s["file"] for s in m["shards"]) == files
    for s in m["shards"]:
        path = out / s["file"]
        assert s["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
        toks = sh.read_tokens(path)
        assert s["tokens"] == len(toks)
        assert s["documents"] == int((toks == 50256).sum())
        assert f"_{s['split']}_" in s["file"]
    assert m["shards"][0]["file"] == "files_val_000000.bin"
    assert sum(s["documents"] for s in m["shards"]) == m["documents"] == 20
    assert sh.verify_dataset(out, progress=False)["hashed"] is True


def test_verify_detects_a_changed_byte(cli, tmp_path):
    out = prepared(tmp_path)
    victim = sorted(out.glob("*_train_*.bin"))[1]
    data = bytearray(victim.read_bytes())
    data[1030] ^= 1
    victim.write_bytes(bytes(data))
    with pytest.raises(UserError, match=victim.name):
        sh.verify_dataset(out, progress=False)
    r = cli("data", "verify", str(out))
    assert_user_error(r, victim.name, "sha256")


def test_cli_data_info_and_errors(cli, tmp_path):
    out = prepared(tmp_path)
    r = cli("data", "info", str(out))
    assert r.returncode == 0, r.stderr
    assert "train" in r.stdout and "val" in r.stdout and "files" in r.stdout
    r = cli("data", "verify", str(out))
    assert r.returncode == 0 and "OK" in r.stdout, r.stderr
    assert_user_error(cli("data", "info", str(tmp_path / "nope")), "no such directory")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert_user_error(cli("data", "info", str(empty)), "no token shards")
    # truncated shard: the manifest's count no longer matches the file
    victim = sorted(out.glob("*.bin"))[0]
    victim.write_bytes(victim.read_bytes()[:-2])
    assert_user_error(cli("data", "verify", str(out)), victim.name, "truncated")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "x_train_000000.bin").write_bytes(_header(magic=7) + b"\0" * 6)
    assert_user_error(cli("data", "info", str(bad)), "bad magic")
