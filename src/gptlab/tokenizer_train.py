"""Train a GPT-2-style byte-level BPE on any corpus (`gptlab tokenizer train`).

The trainer is Hugging Face `tokenizers` (Rust, multi-threaded), with GPT-2's pre-tokenization
(its split pattern over the byte-level alphabet, no prefix space). The result is written in
GPT-2's own file format, vocab.json + merges.txt, with ids laid out as GPT-2's: the 256 bytes
(in GPT-2's order), one id per merge in merge order, then <|endoftext|>. So `--vocab-size N`
gives N - 256 merges and N + 1 ids; `--vocab-size 256` is a pure byte-level tokenizer (257 ids).
tiktoken, `tokenizers` and transformers' GPT2TokenizerFast all read those files; gptlab encodes
through tiktoken (tokenizer.FileTokenizer).

Memory: documents are streamed to the trainer from an iterator (in batches), never held whole.
The trainer keeps a count per distinct pre-tokenized word (plus the pair statistics of those
words), so memory grows with the corpus's vocabulary of words, not with its size; `--max-docs`
bounds the input for a corpus whose word list itself is too large.

This module does not import torch.
"""

from __future__ import annotations

import itertools
import json
import sys
import time
from pathlib import Path
from typing import Any, Iterator

from gptlab import tokenizer as tk
from gptlab.atomic import sha256_file, staged_dir, write_json
from gptlab.data.sources import Source
from gptlab.errors import UserError

MIN_VOCAB = 256
MAX_VOCAB = tk.MAX_VOCAB - 1  # N + 1 ids (with <|endoftext|>) must fit uint16 shards
BATCH_DOCS = 64


def check_vocab_size(n: int) -> None:
    if n < MIN_VOCAB:
        raise UserError(f"--vocab-size {n}: a byte-level BPE has at least the 256 bytes (256 is pure bytes)")
    if n > MAX_VOCAB:
        raise UserError(f"--vocab-size {n}: too large; shards store token ids as uint16, so the vocabulary "
                        f"(with <|endoftext|>) holds at most {tk.MAX_VOCAB:,} ids: --vocab-size {MAX_VOCAB} at most")


def _batches(docs: Iterator[str], counter: list[int]) -> Iterator[list[str]]:
    while True:
        batch = list(itertools.islice(docs, BATCH_DOCS))
        if not batch:
            return
        counter[0] += len(batch)
        counter[1] += sum(len(d.encode("utf-8", "surrogatepass")) for d in batch)
        yield batch


def _merge_pair(m: Any) -> tuple[str, str]:
    # tokenizers writes a merge as "a b" (older) or ["a", "b"] (0.20 and later)
    if isinstance(m, str):
        a, _, b = m.partition(" ")
        return a, b
    return m[0], m[1]


def train_tokenizer(source: Source, out_dir: str | Path, vocab_size: int, *, max_docs: int | None = None,
                    min_frequency: int = 2, name: str | None = None, progress: bool = True,
                    log=None) -> dict[str, Any]:
    """Train a byte-level BPE of vocab_size (bytes + merges) on source and write the tokenizer
    directory out_dir (whole or not at all). Returns its manifest."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    check_vocab_size(vocab_size)
    log = log or (lambda msg: None)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: exists and is not a directory")
    if out.exists() and any(out.iterdir()) and not (out / tk.MANIFEST).is_file():
        raise UserError(f"{out}: exists, is not empty and is not a tokenizer directory; choose another --out")
    n_docs = source.count()
    if max_docs is not None:
        n_docs = max_docs if n_docs is None else min(n_docs, max_docs)
    t0 = time.perf_counter()
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                  show_progress=progress and sys.stderr.isatty(),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[])
    docs = source.documents(0)
    if max_docs is not None:
        docs = itertools.islice(docs, max_docs)
    seen = [0, 0]  # documents, bytes
    batches = _batches(docs, seen)
    if progress:
        from tqdm import tqdm

        batches = _with_bar(batches, tqdm(total=n_docs, unit="doc", desc=f"tokenizer {source.name}",
                                          file=sys.stderr, dynamic_ncols=True, disable=None))
    bpe.train_from_iterator(batches, trainer=trainer, length=n_docs)
    if seen[0] == 0:
        raise UserError(f"{source.name}: no documents to train a tokenizer on")
    seconds = time.perf_counter() - t0

    model = json.loads(bpe.to_str())["model"]
    trained_vocab: dict[str, int] = model["vocab"]
    merges = [_merge_pair(m) for m in model["merges"]]
    alphabet = tk.byte_to_char()
    chars = [alphabet[b] for b in tk.gpt2_byte_order()]
    if set(chars) - set(trained_vocab):
        raise AssertionError("the trainer's vocabulary lacks some bytes")
    vocab = {c: i for i, c in enumerate(chars)}
    for a, b in merges:  # one id per merge, in merge order
        vocab.setdefault(a + b, len(vocab))
    if len(vocab) != 256 + len(merges):
        raise AssertionError("a merge repeats a token")
    eot = len(vocab)
    vocab[tk.EOT_TEXT] = eot
    if len(merges) < vocab_size - 256:
        log(f"note: the corpus gave only {len(merges):,} merges (min frequency {min_frequency}): "
            f"{eot + 1:,} ids instead of {vocab_size + 1:,}")

    with staged_dir(out) as tmp:
        (tmp / tk.VOCAB_JSON).write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
        (tmp / tk.MERGES_TXT).write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges),
                                         encoding="utf-8")
        hashes = {f: sha256_file(tmp / f) for f in (tk.VOCAB_JSON, tk.MERGES_TXT)}
        manifest = {
            "format": tk.MANIFEST_FORMAT, "format_version": 1, "name": name or out.name,
            "kind": "byte-level BPE, GPT-2 pre-tokenization",
            "vocab_size": eot + 1, "merges": len(merges), "special_tokens": {tk.EOT_TEXT: eot},
            "source": source.describe(), "documents": seen[0], "bytes": seen[1],
            "trainer": {"library": "tokenizers", "version": _version("tokenizers"), "requested_vocab_size": vocab_size,
                        "min_frequency": min_frequency, "max_docs": max_docs, "seconds": round(seconds, 3)},
            "sha256": hashes, "tokenizer_sha256": tk.files_digest(hashes),
        }
        write_json(tmp / tk.MANIFEST, manifest)
    return manifest


def _with_bar(it, bar):
    try:
        for batch in it:
            bar.update(len(batch))
            yield batch
    finally:
        bar.close()


def _version(dist: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


# ------------------------------------------------------------------------------- command line
NAMED = ("shakespeare", "tinyshakespeare", "fineweb-edu", "fineweb")


def add_cli_args(p) -> None:
    sub = p.add_subparsers(dest="tokenizer_command", metavar="ACTION")
    sub.required = True
    t = sub.add_parser("train", help="train a GPT-2-style byte-level BPE on a corpus",
                       description="Train a byte-level BPE (GPT-2 pre-tokenization, <|endoftext|>) with Hugging "
                                   "Face tokenizers and write it as GPT-2-format vocab.json + merges.txt "
                                   "and a manifest. Use it with `gptlab prepare --tokenizer DIR`.")
    t.add_argument("corpus", nargs="+", metavar="CORPUS",
                   help="a named corpus (shakespeare, tinyshakespeare, fineweb-edu, fineweb), or .txt, .jsonl "
                        "and .parquet files, directories and globs (as `prepare files`)")
    t.add_argument("--vocab-size", type=int, required=True, metavar="N",
                   help="bytes + merges (256: pure bytes); <|endoftext|> is id N; at most 65535 (uint16 shards)")
    t.add_argument("--out", required=True, metavar="DIR", help="the tokenizer directory to write")
    t.add_argument("--max-docs", type=int, default=None, help="train on the first N documents only (default: all)")
    t.add_argument("--min-frequency", type=int, default=2, help="a pair is merged only if seen this often (default: 2)")
    t.add_argument("--subset", default="sample-10BT", help="fineweb/fineweb-edu subset (configuration name)")
    t.add_argument("--text-field", default="text", help="the text field of .jsonl/.parquet and hub rows")
    t.add_argument("--cache-dir", default=None, help="download cache (default: $GPTLAB_CACHE, else ~/.cache/gptlab)")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")


def run_cli(args) -> int:
    from gptlab.data.sources import open_source

    if args.max_docs is not None and args.max_docs <= 0:
        raise UserError(f"--max-docs must be positive, got {args.max_docs}")
    check_vocab_size(args.vocab_size)
    corpus = list(args.corpus)
    if corpus[0] in NAMED:
        source = open_source(corpus[0], corpus[1:], cache_dir=args.cache_dir, subset=args.subset,
                             text_field=args.text_field)
    else:
        if corpus[0] == "files":
            corpus = corpus[1:]
        source = open_source("files", corpus, text_field=args.text_field)
    say = lambda msg: print(f"gptlab tokenizer: {msg}", file=sys.stderr, flush=True)  # noqa: E731
    m = train_tokenizer(source, args.out, args.vocab_size, max_docs=args.max_docs, min_frequency=args.min_frequency,
                        progress=not args.no_progress, log=say)
    say(f"trained on {m['documents']:,} documents ({m['bytes']:,} bytes) in {m['trainer']['seconds']:.1f}s: "
        f"{m['vocab_size']:,} ids ({m['merges']:,} merges), <|endoftext|> = {m['special_tokens'][tk.EOT_TEXT]}")
    print(args.out)
    return 0
