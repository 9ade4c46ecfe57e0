"""Token shards on disk: the ONLY code that knows their byte layout and the manifest.

A shard is an llm.c-layout `.bin` file, so that llm.c and modded-nanogpt shards work here and
ours work there:

    header: 256 little-endian int32   [0] magic 20240520, [1] version 1, [2] token count n
    body:   n little-endian uint16    the GPT-2 token ids

A prepared dataset is a directory of shards named `<name>_<split>_<index:06d>.bin` and a
`manifest.json` (format version, tokenizer, source, and per shard: file, split, tokens,
documents, sha256). A directory of `.bin` shards without a manifest is accepted as it is, the
split read from each file name. While `gptlab prepare` runs, `progress.json` stands in for the
manifest; a directory holding only that is an unfinished prepare and is refused.

A chat dataset (`gptlab prepare chat`, manifest key "chat") has one loss mask per shard, beside it,
so that the token shard itself stays an llm.c shard:

    <shard stem>.mask   header: 256 little-endian int32  [0] magic 20261126, [1] version 1, [2] n
                        body:   n uint8, 1 where the token is a training target (assistant text and
                                its end token), else 0

Its manifest entry names it ("mask") with its sha256 ("mask_sha256"); each conversation is one
document, opened by the end-of-text token.

This module does not import torch.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from gptlab.atomic import replaced_file, sha256_file, write_json
from gptlab.config import EOT_TOKEN, GPT2_VOCAB_SIZE, read_json
from gptlab.errors import UserError

MAGIC = 20240520
VERSION = 1
HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4  # 1024
TOKEN_DTYPE = np.dtype("<u2")

MASK_MAGIC = 20261126
MASK_SUFFIX = ".mask"
MASK_DTYPE = np.dtype("u1")

MANIFEST = "manifest.json"
PROGRESS = "progress.json"
FORMAT = "gptlab.token-shards"
FORMAT_VERSION = 1
SPLITS = ("train", "val")


def shard_name(name: str, split: str, index: int) -> str:
    """`shakespeare_val_000000.bin`: the index counts shards of both splits together, as
    build-nanogpt and llm.c number them (val first, then train)."""
    return f"{name}_{split}_{index:06d}.bin"


def split_from_name(filename: str) -> str | None:
    """The split a shard file name says: 'val' or 'train' as a word of the name (fineweb_val_000000.bin),
    else as a substring; None when it says neither."""
    stem = filename.rsplit(".", 1)[0].lower()
    words = set(re.split(r"[^a-z0-9]+", stem))
    for split in ("val", "train"):
        if split in words:
            return split
    for split in ("val", "train"):
        if split in stem:
            return split
    return None


def _header(n_tokens: int) -> bytes:
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[0], header[1], header[2] = MAGIC, VERSION, n_tokens
    return header.tobytes()


def write_shard(path: str | Path, tokens: np.ndarray) -> str:
    """Write tokens (n,) as a shard that appears whole or not at all (atomic.replaced_file).
    Returns the sha256 of the file's bytes."""
    path = Path(path)
    tokens = np.ascontiguousarray(tokens, dtype=TOKEN_DTYPE)
    if tokens.ndim != 1:
        raise ValueError(f"tokens must be 1-D, got shape {tokens.shape}")
    if len(tokens) >= 2**31:
        raise ValueError("a shard holds fewer than 2**31 tokens (int32 header)")
    header = _header(len(tokens))
    h = hashlib.sha256(header)
    body = memoryview(tokens).cast("B")
    h.update(body)
    with replaced_file(path, "wb") as f:
        f.write(header)
        f.write(body)
    return h.hexdigest()


def mask_name(shard_file: str) -> str:
    """`chat_train_000001.mask` beside `chat_train_000001.bin`."""
    return shard_file.rsplit(".", 1)[0] + MASK_SUFFIX


def write_mask(path: str | Path, mask: np.ndarray) -> str:
    """Write a loss mask (n,) of 0/1 for the shard of the same n tokens; returns its sha256."""
    mask = np.ascontiguousarray(mask, dtype=MASK_DTYPE)
    if mask.ndim != 1 or (len(mask) and int(mask.max()) > 1):
        raise ValueError("a mask is 1-D and holds only 0 and 1")
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[0], header[1], header[2] = MASK_MAGIC, VERSION, len(mask)
    h = hashlib.sha256(header.tobytes())
    h.update(memoryview(mask).cast("B"))
    with replaced_file(Path(path), "wb") as f:
        f.write(header.tobytes())
        f.write(memoryview(mask).cast("B"))
    return h.hexdigest()


def open_mask(path: str | Path, n_tokens: int) -> np.ndarray:
    """A shard's loss mask as a read-only memory map (n,) uint8, its header checked against n."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            raw = f.read(HEADER_BYTES)
        size = path.stat().st_size
    except OSError as e:
        raise UserError(f"mask {path}: cannot read: {e.strerror or e}") from None
    if len(raw) < HEADER_BYTES:
        raise UserError(f"mask {path}: truncated ({size} bytes)")
    magic, version, n = (int(v) for v in np.frombuffer(raw, dtype="<i4", count=3))
    if magic != MASK_MAGIC or version != VERSION:
        raise UserError(f"mask {path}: bad magic {magic} or version {version}: not a gptlab loss mask")
    if n != n_tokens or size != HEADER_BYTES + n:
        raise UserError(f"mask {path}: holds {n} values ({size} bytes) for a shard of {n_tokens} tokens")
    if n == 0:
        return np.zeros(0, dtype=MASK_DTYPE)
    return np.memmap(path, dtype=MASK_DTYPE, mode="r", offset=HEADER_BYTES, shape=(n,))


def open_checked_mask(shard: "Shard") -> np.ndarray:
    """A chat shard's loss mask, its bytes checked against the manifest's sha256."""
    if shard.mask is None:
        raise UserError(f"shard {shard.path}: no loss mask (not a chat dataset)")
    if shard.mask_sha256 is not None and sha256_file(shard.mask) != shard.mask_sha256:
        raise UserError(f"mask {shard.mask}: content does not match the manifest's sha256; prepare it again")
    return open_mask(shard.mask, shard.tokens)


def is_chat(manifest: dict[str, Any] | None) -> bool:
    """Whether a manifest is a chat dataset's (conversations with loss masks)."""
    return bool(manifest) and isinstance(manifest.get("chat"), dict)


def shard_bytes(n_tokens: int) -> int:
    """The size in bytes of a shard of n tokens."""
    return HEADER_BYTES + 2 * n_tokens


def parse_header(raw: bytes, size: int, where: str) -> int:
    """Check a shard's first bytes (at least the header) against its size in bytes; return its
    token count. `where` names the shard in errors (a path or a URL)."""
    if len(raw) < HEADER_BYTES:
        raise UserError(f"shard {where}: truncated ({size} bytes, shorter than the {HEADER_BYTES}-byte header)")
    magic, version, n = (int(v) for v in np.frombuffer(raw, dtype="<i4", count=3))
    if magic != MAGIC:
        raise UserError(f"shard {where}: bad magic {magic} (expected {MAGIC}): not an llm.c token shard")
    if version != VERSION:
        raise UserError(f"shard {where}: unsupported version {version} (expected {VERSION}: GPT-2 uint16 tokens)")
    want = shard_bytes(n)
    if n < 0 or size != want:
        raise UserError(f"shard {where}: truncated or damaged: header says {n} tokens ({want} bytes) "
                        f"but the file has {size} bytes")
    return n


def read_header(path: str | Path) -> int:
    """Check a shard's header against its size; return its token count."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            raw = f.read(HEADER_BYTES)
        size = path.stat().st_size
    except FileNotFoundError:
        raise UserError(f"shard {path}: no such file") from None
    except OSError as e:
        raise UserError(f"shard {path}: cannot read: {e.strerror or e}") from None
    return parse_header(raw, size, str(path))


def open_tokens(path: str | Path, n_tokens: int | None = None) -> np.ndarray:
    """The shard's tokens as a read-only memory map, (n,) uint16; nothing is read until used."""
    n = read_header(path) if n_tokens is None else n_tokens
    if n == 0:
        return np.zeros(0, dtype=TOKEN_DTYPE)
    return np.memmap(path, dtype=TOKEN_DTYPE, mode="r", offset=HEADER_BYTES, shape=(n,))


def check_vocab(tokens: np.ndarray, where: str, vocab_size: int = GPT2_VOCAB_SIZE,
                model_vocab: int | None = None) -> None:
    """Refuse token ids the model has no embedding for: one vectorised max, about 0.1 s per 100M
    tokens. vocab_size: the data's tokenizer's; model_vocab: a smaller model's own (--vocab-size)."""
    smaller = model_vocab is not None and model_vocab < vocab_size
    limit = model_vocab if smaller else vocab_size
    if not len(tokens) or int(tokens.max()) < limit:
        return
    bad = int(np.argmax(tokens >= limit))
    if smaller:
        why = (f"the model's vocabulary of {limit} (--vocab-size); give a vocabulary that holds the data's ids")
    else:
        name = "GPT-2's vocabulary" if vocab_size == GPT2_VOCAB_SIZE else "the dataset tokenizer's vocabulary"
        why = f"{name} of {limit}; the shard is corrupt or from another tokenizer"
    raise UserError(f"shard {where}: token {bad} is id {int(tokens[bad])}, outside {why}")


def open_checked(shard: "Shard", vocab_size: int | None = None, model_vocab: int | None = None) -> np.ndarray:
    """A shard's tokens for training or evaluation, checked first: its bytes against the manifest's
    sha256 (when it has one) and its ids against the vocabulary."""
    if shard.sha256 is not None:
        got = sha256_file(shard.path)
        if got != shard.sha256:
            raise UserError(f"shard {shard.path}: content does not match the manifest's sha256 (corrupt or "
                            f"changed since prepare); run `gptlab data verify` and prepare it again")
    tokens = open_tokens(shard.path, shard.tokens)
    check_vocab(tokens, str(shard.path), vocab_size or shard.vocab_size, model_vocab)
    return tokens


def read_tokens(path: str | Path) -> np.ndarray:
    """The shard's tokens in memory, (n,) uint16."""
    return np.array(open_tokens(path))


# ------------------------------------------------------------------------------------- datasets
@dataclass(frozen=True)
class Shard:
    path: Path
    split: str
    tokens: int
    documents: int | None = None  # None for shards without a manifest
    sha256: str | None = None
    vocab_size: int = GPT2_VOCAB_SIZE  # ids must be below it: the dataset's tokenizer's size
    mask: Path | None = None  # a chat dataset's loss mask
    mask_sha256: str | None = None


def manifest_vocab_size(manifest: dict[str, Any] | None) -> int:
    """The vocabulary a dataset's ids come from: its recorded tokenizer's, else GPT-2's."""
    info = (manifest or {}).get("tokenizer") or {}
    return int(info.get("vocab_size") or GPT2_VOCAB_SIZE)


@dataclass
class Dataset:
    """A directory of shards, opened and checked (headers against sizes and the manifest)."""

    directory: Path
    shards: list[Shard]
    manifest: dict[str, Any] | None

    def split(self, name: str) -> list[Shard]:
        return [s for s in self.shards if s.split == name]

    @property
    def splits(self) -> dict[str, list[Shard]]:
        out: dict[str, list[Shard]] = {}
        for s in self.shards:
            out.setdefault(s.split, []).append(s)
        return out

    def source_text(self) -> str:
        return source_text(self.manifest)

    @property
    def chat(self) -> dict[str, Any] | None:
        """The manifest's chat record (template, special tokens), None for plain token data."""
        return self.manifest["chat"] if is_chat(self.manifest) else None


def source_text(manifest: dict[str, Any] | None) -> str:
    if manifest is None:
        return "unknown (llm.c-style shards without a manifest)"
    src = dict(manifest.get("source", {}))
    name = src.pop("name", "?")
    # lists of files or texts are long: show how many
    extras = ", ".join(f"{k}={len(v)}" if isinstance(v, list) else f"{k}={v}"
                       for k, v in sorted(src.items()) if v is not None)
    return f"{name} ({extras})" if extras else str(name)


def open_dataset(directory: str | Path) -> Dataset:
    """Open a prepared directory (manifest) or a directory of llm.c / modded-nanogpt shards."""
    directory = Path(directory)
    if not directory.exists():
        raise UserError(f"{directory}: no such directory")
    if not directory.is_dir():
        raise UserError(f"{directory}: not a directory")
    manifest_path = directory / MANIFEST
    if manifest_path.exists():
        manifest = read_manifest(directory)
        shards, vocab = [], manifest_vocab_size(manifest)
        for entry in manifest["shards"]:
            path = directory / entry["file"]
            n = read_header(path)
            if n != entry["tokens"]:
                raise UserError(f"shard {path}: holds {n} tokens but the manifest says {entry['tokens']}")
            mask = None
            if is_chat(manifest):
                if not isinstance(entry.get("mask"), str) or not _plain_name(entry["mask"]):
                    raise UserError(f"{manifest_path}: chat shard {entry['file']} names no loss mask")
                mask = directory / entry["mask"]
                open_mask(mask, n)  # header against the shard
            shards.append(Shard(path, entry["split"], n, entry.get("documents"), entry.get("sha256"), vocab,
                                mask=mask, mask_sha256=entry.get("mask_sha256")))
        if not shards:
            raise UserError(f"{directory}: the manifest lists no shards")
        return Dataset(directory, shards, manifest)
    if (directory / PROGRESS).exists():
        raise UserError(f"{directory}: an unfinished prepare (progress.json, no manifest.json); "
                        f"run the same `gptlab prepare` again to finish it")
    shards = []
    for path in sorted(directory.glob("*.bin")):
        split = split_from_name(path.name)
        if split is None:
            continue  # neither val nor train: not a shard of a split we can use
        shards.append(Shard(path, split, read_header(path)))
    if not shards:
        raise UserError(f"{directory}: no token shards (*.bin with 'train' or 'val' in the name, or a manifest.json)")
    return Dataset(directory, shards, None)


def read_manifest(directory: str | Path) -> dict[str, Any]:
    path = Path(directory) / MANIFEST
    return check_manifest(read_json(path), str(path))


def check_manifest(m: Any, where: str) -> dict[str, Any]:
    """Validate a manifest's JSON (read from a file or a URL named `where`); return it."""
    if not isinstance(m, dict):
        raise UserError(f"{where}: expected a JSON object")
    if m.get("format") != FORMAT:
        raise UserError(f"{where}: not a gptlab shard manifest (format {m.get('format')!r})")
    if m.get("format_version") != FORMAT_VERSION:
        raise UserError(f"{where}: unsupported manifest version {m.get('format_version')!r} (expected {FORMAT_VERSION})")
    shards = m.get("shards")
    if not isinstance(shards, list):
        raise UserError(f"{where}: no shard list")
    for i, e in enumerate(shards):
        ok = (isinstance(e, dict) and isinstance(e.get("file"), str) and e.get("split") in SPLITS
              and isinstance(e.get("tokens"), int) and isinstance(e.get("sha256"), str)
              and _plain_name(e["file"]))
        if not ok:
            raise UserError(f"{where}: shard entry {i} is malformed")
    return m


def _plain_name(name: str) -> bool:
    return "/" not in name and "\\" not in name and name not in ("", ".", "..")


@dataclass(frozen=True)
class Entry:
    """One shard as a listing knows it before it is on disk (from a manifest or a file listing)."""

    file: str
    split: str
    tokens: int
    documents: int | None = None
    sha256: str | None = None

    @property
    def size(self) -> int:
        return shard_bytes(self.tokens)


def manifest_entries(m: dict[str, Any]) -> list[Entry]:
    """The shards a checked manifest lists, in its order."""
    return [Entry(e["file"], e["split"], e["tokens"], e.get("documents"), e["sha256"]) for e in m["shards"]]


def write_manifest(directory: str | Path, manifest: dict[str, Any]) -> None:
    write_json(Path(directory) / MANIFEST, manifest, sort_keys=True)


def split_totals(shards: list[dict[str, Any]] | list[Shard]) -> dict[str, dict[str, Any]]:
    """Per split: shard count, tokens, documents (None when unknown)."""
    out: dict[str, dict[str, Any]] = {}
    for s in shards:
        split, tokens, docs = ((s["split"], s["tokens"], s.get("documents")) if isinstance(s, dict)
                               else (s.split, s.tokens, s.documents))
        t = out.setdefault(split, {"shards": 0, "tokens": 0, "documents": 0})
        t["shards"] += 1
        t["tokens"] += tokens
        t["documents"] = None if docs is None or t["documents"] is None else t["documents"] + docs
    return out


def dataset_summary(directory: str | Path) -> dict[str, Any]:
    """What `gptlab data info` prints, as data."""
    ds = open_dataset(directory)
    return summarize(str(ds.directory), ds.shards, ds.manifest)


def summarize(where: str, shards: list[Shard] | list[Entry], manifest: dict[str, Any] | None) -> dict[str, Any]:
    """A dataset summary from its shards (on disk or listed) and its manifest (None without one)."""
    return {
        "directory": where,
        "manifest": manifest is not None,
        "source": source_text(manifest),
        "tokenizer": (manifest or {}).get("tokenizer", {}).get("name"),
        "chat": (manifest or {}).get("chat_stats") if is_chat(manifest) else None,
        "splits": split_totals(shards),
        "tokens": sum(s.tokens for s in shards),
        "documents": (None if any(s.documents is None for s in shards)
                      else sum(s.documents for s in shards)),
    }


class Digest:
    """sha256 and end-of-text count of a shard's bytes fed in blocks of any size (for downloads)."""

    def __init__(self) -> None:
        self.sha = hashlib.sha256()
        self.seen = 0
        self.eots = 0
        self._odd = b""  # a token split across two blocks

    def update(self, block: bytes) -> None:
        self.sha.update(block)
        body = block
        if self.seen < HEADER_BYTES:
            body = block[HEADER_BYTES - self.seen:]
        self.seen += len(block)
        body = self._odd + body
        even = len(body) - len(body) % 2
        self._odd = body[even:]
        self.eots += int(np.count_nonzero(np.frombuffer(body, dtype=TOKEN_DTYPE, count=even // 2) == EOT_TOKEN))

    def hexdigest(self) -> str:
        return self.sha.hexdigest()


def check_digest(name: str, entry: Entry | Shard, digest: str, eots: int | None) -> None:
    """UserError when a shard's sha256 or document count differs from its manifest entry."""
    if entry.sha256 is not None and digest != entry.sha256:
        raise UserError(f"shard {name}: sha256 {digest} does not match the manifest's {entry.sha256}")
    if eots is not None and entry.documents is not None and eots != entry.documents:
        raise UserError(f"shard {name}: holds {eots} documents but the manifest says {entry.documents}")


def _hash_and_count(path: Path, chunk_tokens: int = 1 << 22, eot: int = EOT_TOKEN) -> Iterator[tuple[int, str | None, int]]:
    """Yield (bytes read so far, None, eot count so far) while reading, then the final sha256."""
    h = hashlib.sha256()
    eots = 0
    done = 0
    with open(path, "rb") as f:
        header = f.read(HEADER_BYTES)
        h.update(header)
        done += len(header)
        while block := f.read(2 * chunk_tokens):
            h.update(block)
            # Documents are counted as the end-of-text tokens that open them.
            eots += int(np.count_nonzero(np.frombuffer(block, dtype=TOKEN_DTYPE, count=len(block) // 2) == eot))
            done += len(block)
            yield done, None, eots
    yield done, h.hexdigest(), eots


def verify_dataset(directory: str | Path, progress: bool = True) -> dict[str, Any]:
    """Re-hash every shard against the manifest (and count its documents); UserError naming the
    first shard that differs. Without a manifest only headers and sizes can be checked."""
    ds = open_dataset(directory)  # headers, sizes and manifest token counts
    if ds.manifest is None:
        return {"directory": str(ds.directory), "shards": len(ds.shards), "hashed": False}
    from tqdm import tqdm

    total = sum(HEADER_BYTES + 2 * s.tokens for s in ds.shards)
    eot = int((ds.manifest.get("tokenizer") or {}).get("eot", EOT_TOKEN))  # a trained tokenizer's own
    with tqdm(total=total, unit="B", unit_scale=True, desc="verify", disable=None if progress else True,
              file=None) as bar:
        for s in ds.shards:
            last = 0
            for done, digest, eots in _hash_and_count(s.path, eot=eot):
                bar.update(done - last)
                last = done
            check_digest(s.path.name, s, digest, eots)
            if s.mask is not None and s.mask_sha256 is not None and sha256_file(s.mask) != s.mask_sha256:
                raise UserError(f"mask {s.mask.name}: sha256 does not match the manifest's")
    return {"directory": str(ds.directory), "shards": len(ds.shards), "hashed": True,
            "tokens": sum(s.tokens for s in ds.shards)}
