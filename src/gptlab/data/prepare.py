"""Documents -> GPT-2 tokens -> shards: in parallel, in bounded memory, resumable, with progress.

The token stream is every document, in source order, each preceded by the end-of-text token
50256, tokenized exactly as given. The validation split is a prefix of whole documents (like
build-nanogpt's first shard, but never a slice through a document): by default about 0.5% of the
documents (at least one when there are two or more), capped at 10M tokens. Shards are filled to
--shard-tokens in stream order (a document may continue in the next shard of its split); the
last val shard is closed at the first training document.

Resuming: after every shard, progress.json records the shards written and where the stream
stands at their end: the next document's index and how many of its tokens the shards already
hold. A rerun skips the documents before that point without tokenizing them, re-tokenizes the
one document that straddles the boundary, and continues; the output is byte-identical to an
uninterrupted prepare. manifest.json is written last, and its presence means finished.

This module does not import torch.
"""

from __future__ import annotations

import collections
import itertools
import json
import multiprocessing
import os
import re
import signal
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from fractions import Fraction
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from gptlab import tokenizer as tk
from gptlab.atomic import disk_full_guard, remove_leftovers, write_json
from gptlab.config import EOT_TOKEN, read_json
from gptlab.data import shards as sh
from gptlab.data.sources import Source
from gptlab.errors import UserError

DEFAULT_SHARD_TOKENS = 100_000_000  # as build-nanogpt
DEFAULT_VAL_FRACTION = Fraction(5, 1000)  # of documents
DEFAULT_VAL_TOKENS_CAP = 10_000_000
BATCH_CHARS = 1 << 20  # characters sent to a worker at a time: large enough to amortise IPC
BATCH_DOCS = 4096
KILL_ENV = "GPTLAB_TEST_KILL"  # test hook: "shard:N" or "progress:N" SIGKILLs this process
# what a prepare of an earlier version left when killed (before atomic.py's one spelling)
_OLD_TEMPS = re.compile(r".+\.bin\.tmp|(progress|manifest)\.json\.tmp")


def available_cores() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


# --------------------------------------------------------------------------------- tokenizing
_TOKENIZER: list = []  # the tokenizer of this prepare (empty: GPT-2's); workers inherit or rebuild it


def _tokenizer():
    return _TOKENIZER[0] if _TOKENIZER else tk.get_tokenizer()


def use_tokenizer(spec: str | Path | None) -> Any:
    """Make `spec` (None or "gpt2": GPT-2's; else a tokenizer directory) the one encode_texts uses."""
    tok = tk.load_tokenizer(spec)
    _TOKENIZER[:] = [] if spec is None or str(spec) == tk.NAME else [tok]
    return tok


def encode_texts(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Tokenize documents (special-token text as plain text) into one stream, each document
    preceded by EOT. Returns tokens (sum(lengths),) uint16 and lengths (n,) int64, EOT included.
    Runs in worker processes; arrays pickle back as raw buffers, far cheaper than lists."""
    tok = _tokenizer()
    enc, eot = tok.enc, tok.eot
    pieces = []
    for text in texts:
        pieces.append(_encode(enc, text))
    lengths = np.fromiter((len(p) + 1 for p in pieces), dtype=np.int64, count=len(pieces))
    out = np.empty(int(lengths.sum()), dtype=np.uint16)
    pos = 0
    for p in pieces:
        out[pos] = eot
        out[pos + 1: pos + 1 + len(p)] = p  # ids < 65536 fit uint16
        pos += 1 + len(p)
    return out, lengths


def _encode(enc, text: str) -> np.ndarray:
    # encode_to_numpy with no special tokens allowed or checked is encode_ordinary without the
    # Python list; tiktoken < 0.8 lacks it.
    if not hasattr(enc, "encode_to_numpy"):
        return np.asarray(enc.encode_ordinary(text), dtype=np.uint32)
    try:
        return enc.encode_to_numpy(text, disallowed_special=())
    except UnicodeEncodeError:
        # Lone surrogates (from JSON escapes) cannot be UTF-8; tiktoken's encode_ordinary
        # replaces them the same way, so counts equal a direct tiktoken count.
        text = text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
        return enc.encode_to_numpy(text, disallowed_special=())


def _batches(docs: Iterator[str]) -> Iterator[list[str]]:
    batch: list[str] = []
    chars = 0
    for d in docs:
        batch.append(d)
        chars += len(d)
        if chars >= BATCH_CHARS or len(batch) >= BATCH_DOCS:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


def _worker_init(parent: int, tokenizer: str | None = None) -> None:
    # Ctrl-C reaches the whole process group: the parent handles it and shuts the pool down,
    # so workers must not die printing tracebacks of their own.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # A parent killed outright (SIGKILL, the OOM killer) cannot shut the pool down, and the workers
    # would wait on their queue forever: make them die with it.
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass
    if os.getppid() != parent:  # it died before prctl took effect
        os._exit(1)
    if not sys.platform.startswith("linux"):
        import threading

        def watch() -> None:
            while os.getppid() == parent:
                time.sleep(1.0)
            os._exit(1)

        threading.Thread(target=watch, daemon=True).start()
    if tokenizer is not None and not _TOKENIZER:  # spawned, not forked: build it here
        use_tokenizer(tokenizer)


def _warm(_: int = 0) -> int:
    return os.getpid()


def start_pool(workers: int) -> ProcessPoolExecutor | None:
    """Worker processes, started now: forked (where possible) after the encoding is built, so they
    inherit it instead of rebuilding it, and before any thread exists in this process."""
    if workers <= 1:
        return None
    tok = _tokenizer()
    spec = str(tok.path) if _TOKENIZER else None
    methods = multiprocessing.get_all_start_methods()
    ctx = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
    pool = ProcessPoolExecutor(workers, mp_context=ctx, initializer=_worker_init,
                               initargs=(os.getpid(), spec))
    list(pool.map(_warm, range(workers)))
    return pool


def encoded(docs: Iterator[str], pool: ProcessPoolExecutor | None, workers: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(tokens, lengths) per batch of documents, in order. At most 2 batches per worker are in
    flight, so memory stays bounded however large the corpus."""
    if pool is None:
        for batch in _batches(docs):
            yield encode_texts(batch)
        return
    pending: collections.deque = collections.deque()
    try:
        for batch in _batches(docs):
            pending.append(pool.submit(encode_texts, batch))
            if len(pending) >= 2 * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        for f in pending:
            f.cancel()


# ----------------------------------------------------------------------------- validation plan
def _round_half_up(x: Fraction) -> int:
    return int((x + Fraction(1, 2)) // 1)


def val_plan(num_docs: int | None, *, budget: int | None, val_fraction: float | None,
             val_tokens: int | None) -> dict[str, int | None]:
    """How many leading documents (max_docs) and tokens (max_tokens) the val split may take;
    None = no limit from that side. A document goes to val while both limits allow it."""
    frac = None if val_fraction is None else Fraction(repr(float(val_fraction)))
    if num_docs is not None:
        n = num_docs
        if frac is None and val_tokens is None:
            docs = max(_round_half_up(DEFAULT_VAL_FRACTION * n), 1 if n >= 2 else 0)
            toks: int | None = DEFAULT_VAL_TOKENS_CAP
        elif frac is not None:
            docs = _round_half_up(frac * n)
            if frac > 0 and n >= 2:
                docs = max(docs, 1)
            toks = val_tokens
        else:
            docs, toks = n, val_tokens
        docs = min(docs, max(n - 1, 0))  # always leave a training document
        return {"max_docs": docs, "max_tokens": toks}
    # A stream of unknown length: limit val by tokens.
    if frac is None and val_tokens is None:
        toks = DEFAULT_VAL_TOKENS_CAP
        if budget is not None:
            toks = min(toks, max(1, _round_half_up(DEFAULT_VAL_FRACTION * budget)))
    elif frac is not None:
        if budget is None:
            raise UserError("--val-fraction needs a known number of documents: give --max-docs or a --tokens "
                            "budget, or use --val-tokens")
        toks = _round_half_up(frac * budget)
        if val_tokens is not None:
            toks = min(toks, val_tokens)
    else:
        toks = val_tokens
    return {"max_docs": None, "max_tokens": toks}


# ------------------------------------------------------------------------------------ writing
def _kill_hook(event: str, n_shards: int) -> None:
    spec = os.environ.get(KILL_ENV)
    if spec and spec == f"{event}:{n_shards}":
        os.kill(os.getpid(), signal.SIGKILL)


class _ShardWriter:
    """Fills one shard buffer of the current split and writes it when full; records progress
    after every shard so that a rerun can continue exactly there."""

    def __init__(self, out: Path, name: str, capacity: int, shards: list[dict[str, Any]],
                 stream_tokens: int, save_progress: Callable[[dict[str, Any]], None], eot: int = EOT_TOKEN) -> None:
        self.out, self.name, self.capacity, self.eot = out, name, capacity, eot
        self.shards = shards
        self.stream_tokens = stream_tokens  # tokens in complete shards
        self.save_progress = save_progress
        # np.empty reserves address space only: a small corpus never touches most of a 100M buffer.
        self.buf = np.empty(capacity, dtype=np.uint16)
        self.fill = 0
        self.split: str | None = None

    def add(self, split: str, tokens: np.ndarray, ends: np.ndarray, first_doc: int, first_skip: int) -> None:
        """Append the tokens of documents first_doc, first_doc+1, ... (the first lacking its first
        first_skip tokens); ends (m,) are each document's end offset in tokens."""
        if split != self.split:
            assert self.fill == 0, "a split changes only at a flushed shard"
            self.split = split
        pos, n = 0, len(tokens)
        while pos < n:
            take = min(self.capacity - self.fill, n - pos)
            self.buf[self.fill: self.fill + take] = tokens[pos: pos + take]
            self.fill += take
            pos += take
            if self.fill == self.capacity:
                # Where the stream stands: j documents have ended by pos; the next one (first_doc+j)
                # has (pos - its start) tokens in the shards written so far.
                j = int(np.searchsorted(ends, pos, side="right"))
                start = int(ends[j - 1]) if j > 0 else -first_skip
                self.flush(first_doc + j, pos - start)

    def flush(self, next_doc: int, skip: int) -> None:
        if self.fill == 0:
            return
        tokens = self.buf[: self.fill]
        index = len(self.shards)
        fname = sh.shard_name(self.name, self.split, index)
        digest = sh.write_shard(self.out / fname, tokens)
        self.shards.append({
            "file": fname, "split": self.split, "tokens": int(self.fill),
            # each document opens with EOT, and text never encodes to EOT: EOTs count documents
            "documents": int(np.count_nonzero(tokens == self.eot)), "sha256": digest,
        })
        self.stream_tokens += self.fill
        self.fill = 0
        _kill_hook("shard", len(self.shards))
        self.save_progress({"next_doc": next_doc, "skip_tokens": skip, "stream_tokens": self.stream_tokens})
        _kill_hook("progress", len(self.shards))


# ------------------------------------------------------------------------------------ prepare
def _diff(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            out += _diff(a.get(k), b.get(k), f"{prefix}.{k}" if prefix else k)
        return out
    return [] if a == b else [prefix or "(all)"]


def _describe_diff(old: dict, new: dict) -> str:
    keys = _diff(old, new)
    shown = ", ".join(keys[:4]) + (", ..." if len(keys) > 4 else "")
    return f"different {shown}"


def prepare(source: Source, out_dir: str | Path, *, name: str | None = None,
            shard_tokens: int = DEFAULT_SHARD_TOKENS, max_docs: int | None = None, tokens: int | None = None,
            val_fraction: float | None = None, val_tokens: int | None = None, workers: int | None = None,
            progress: bool = True, log: Callable[[str], None] | None = None,
            tokenizer: str | Path | None = None) -> dict[str, Any]:
    """Tokenize source into shards under out_dir; continue an unfinished prepare there; do nothing
    to a finished one with the same parameters. Returns a summary (status: prepared, resumed or done).
    tokenizer: None or "gpt2" (GPT-2's), or a directory of `gptlab tokenizer train`, which is
    recorded in the manifest (name, eot, size, hashes) and copied into out_dir/tokenizer."""
    log = log or (lambda msg: None)
    t0 = time.perf_counter()
    out = Path(out_dir)
    name = name or source.name.replace("-", "_")
    workers = available_cores() if workers is None else workers
    _check_args(name, shard_tokens, max_docs, tokens, val_fraction, val_tokens, workers)
    tok = use_tokenizer(tokenizer)
    params = {
        "name": name,
        "source": source.describe(),
        "tokenizer": tk.tokenizer_info(tok),
        "prepare": {"shard_tokens": shard_tokens, "max_docs": max_docs, "tokens": tokens,
                    "val_fraction": val_fraction, "val_tokens": val_tokens},
    }
    params = json.loads(json.dumps(params))  # as it reads back from JSON, for comparisons
    progress_path = out / sh.PROGRESS
    if (out / sh.MANIFEST).exists():
        manifest = _finished(out, params)
        return {"status": "done", "directory": str(out), **_totals(manifest["shards"]),
                "seconds": time.perf_counter() - t0}
    state = _unfinished_state(out, params)
    resumed = bool(state["shards"]) or state["next_doc"] > 0

    n_docs, plan = _count_and_plan(source, out, state, max_docs, tokens, val_fraction, val_tokens)

    def save_progress(position: dict[str, Any]) -> None:
        state.update(position)
        write_json(progress_path, state, sort_keys=True)

    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    save_progress({})  # from here on, a rerun continues this prepare
    start_doc = state["next_doc"]
    if resumed:
        log(f"resuming {out} after {len(state['shards'])} complete shards (document {start_doc:,})")
    pool = None
    try:
        # Workers fork before the progress bar's thread exists, and inherit the built encoding.
        pool = start_pool(workers)
        with disk_full_guard(out):  # a full disk: one line naming it; the complete shards stay
            tokenized = _run(source, out, name, shard_tokens, plan, state, save_progress, pool, workers,
                             n_docs, max_docs, tokens, progress, tok.eot)
    except BaseException:
        if not state["shards"] and not resumed:
            # Failed before its first shard (say, the hub could not be reached): nothing to
            # resume, so leave no unfinished-prepare marker behind.
            progress_path.unlink(missing_ok=True)
            if created and not any(out.iterdir()):
                out.rmdir()
        raise
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
        _TOKENIZER.clear()

    if isinstance(tok, tk.FileTokenizer):  # the data carries its tokenizer (train and sample read it)
        tk.copy_tokenizer(tok, out / tk.DATA_TOKENIZER_DIR)
    manifest = {"format": sh.FORMAT, "format_version": sh.FORMAT_VERSION, **params, "val": plan,
                **_totals(state["shards"]), "shards": state["shards"]}
    sh.write_manifest(out, manifest)
    progress_path.unlink(missing_ok=True)
    return {"status": "resumed" if resumed else "prepared", "directory": str(out), **_totals(state["shards"]),
            "documents": state["next_doc"], "tokenized_documents": tokenized, "resumed_from_doc": start_doc,
            "seconds": time.perf_counter() - t0}


def _count_and_plan(source: Source, out: Path, state: dict[str, Any], max_docs: int | None, tokens: int | None,
                    val_fraction: float | None, val_tokens: int | None) -> tuple[int | None, dict[str, Any]]:
    """The documents to read and the validation plan, recorded in state (a continued prepare must
    find the plan it began with). Counting first surfaces a bad source (a missing file, a failed
    download) before any work."""
    n_docs = source.count()
    if max_docs is not None:
        n_docs = max_docs if n_docs is None else min(n_docs, max_docs)
    plan = val_plan(n_docs, budget=tokens, val_fraction=val_fraction, val_tokens=val_tokens)
    if "val" in state and state["val"] != plan:
        raise UserError(f"{out}: the corpus changed since this prepare began (validation plan differs); "
                        f"choose another --out")
    state["val"] = plan
    return n_docs, plan


def _check_args(name: str, shard_tokens: int, max_docs: int | None, tokens: int | None,
                val_fraction: float | None, val_tokens: int | None, workers: int) -> None:
    if not 1 <= shard_tokens < 2**31:
        raise UserError(f"--shard-tokens must be between 1 and 2**31-1, got {shard_tokens}")
    if val_fraction is not None and not 0 <= val_fraction < 1:
        raise UserError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    for flag, v in (("--max-docs", max_docs), ("--tokens", tokens)):
        if v is not None and v <= 0:
            raise UserError(f"{flag} must be positive, got {v}")
    if val_tokens is not None and val_tokens < 0:
        raise UserError(f"--val-tokens must be non-negative, got {val_tokens}")
    if not name or any(c in name for c in "/\\") or name.startswith("."):
        raise UserError(f"--name {name!r} is not a usable file name prefix")
    if workers < 1:
        raise UserError(f"--workers must be at least 1, got {workers}")


def _finished(out: Path, params: dict[str, Any]) -> dict[str, Any]:
    """The manifest of a finished prepare with these parameters (anything else is refused)."""
    manifest = sh.read_manifest(out)
    old = {k: manifest.get(k) for k in params}
    if old != params:
        raise UserError(f"{out} already holds a dataset prepared with {_describe_diff(old, params)}; "
                        f"choose another --out or remove it")
    (out / sh.PROGRESS).unlink(missing_ok=True)  # stale: the manifest is written before it is removed
    return manifest


def _unfinished_state(out: Path, params: dict[str, Any]) -> dict[str, Any]:
    """The state of an unfinished prepare to continue, or a fresh one for an empty --out."""
    progress_path = out / sh.PROGRESS
    if progress_path.exists():
        state = read_json(progress_path)
        if state.get("format") != sh.FORMAT or state.get("params") != params:
            raise UserError(f"{out} holds an unfinished prepare with {_describe_diff(state.get('params') or {}, params)}; "
                            f"rerun it with its own parameters, or choose another --out")
        _check_written(out, state["shards"])
        remove_leftovers(out, _OLD_TEMPS)  # unfinished shards and progress of the killed prepare
        return state
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: exists and is not a directory")
    if out.exists() and any(out.glob("*.bin")):
        raise UserError(f"{out} already holds .bin files that no prepare of ours is writing; choose an empty --out")
    return {"format": sh.FORMAT, "format_version": sh.FORMAT_VERSION, "params": params, "shards": [],
            "next_doc": 0, "skip_tokens": 0, "stream_tokens": 0}


def _totals(shards: list[dict[str, Any]]) -> dict[str, Any]:
    return {"splits": sh.split_totals(shards), "tokens": sum(s["tokens"] for s in shards),
            "documents": sum(s["documents"] for s in shards), "shard_count": len(shards)}


def _check_written(out: Path, shards: list[dict[str, Any]]) -> None:
    for s in shards:
        n = sh.read_header(out / s["file"])  # UserError when missing or damaged
        if n != s["tokens"]:
            raise UserError(f"{out / s['file']}: holds {n} tokens, but progress.json recorded {s['tokens']}; "
                            f"remove {out} and prepare again")


def _run(source: Source, out: Path, name: str, shard_tokens: int, plan: dict[str, int | None],
         state: dict[str, Any], save_progress: Callable, pool, workers: int, n_docs: int | None,
         max_docs: int | None, budget: int | None, progress: bool, eot: int = EOT_TOKEN) -> int:
    """The stream loop. Returns how many documents were tokenized in this run."""
    from tqdm import tqdm

    doc = state["next_doc"]  # global index of the next document to take
    skip = state["skip_tokens"]  # tokens of that document already in complete shards
    total = state["stream_tokens"] - skip  # tokens of all documents before `doc`
    writer = _ShardWriter(out, name, shard_tokens, state["shards"], state["stream_tokens"], save_progress, eot)
    vmax_docs, vmax_tokens = plan["max_docs"], plan["max_tokens"]
    if vmax_docs is None and vmax_tokens is None:
        raise AssertionError("an unlimited validation split")
    tokenized = 0

    def done() -> bool:
        return (budget is not None and total >= budget) or (max_docs is not None and doc >= max_docs)

    if done():
        writer.flush(doc, 0)
        return 0
    docs = source.documents(doc)
    if max_docs is not None:
        docs = itertools.islice(docs, max_docs - doc)

    # A bar of documents when their number is known (with an ETA), else of tokens toward the budget.
    by_docs = n_docs is not None or budget is None
    bar = tqdm(total=(n_docs - doc) if n_docs is not None else (budget - total if budget else None),
               unit="doc" if by_docs else "tok", unit_scale=True, desc=f"prepare {source.name}",
               disable=None if progress else True, file=sys.stderr, dynamic_ncols=True, smoothing=0.1)
    t_start = time.perf_counter()
    run_tokens = run_docs = 0
    try:
        for tokens, lengths in encoded(docs, pool, workers):
            offs = np.zeros(len(lengths) + 1, dtype=np.int64)
            np.cumsum(lengths, out=offs[1:])  # offs[i]: where document i of the batch starts
            n = len(lengths)
            tokenized += n
            a = 0
            while a < n and not done():
                is_val = ((vmax_docs is None or doc < vmax_docs) and (vmax_tokens is None or total < vmax_tokens))
                if is_val:
                    b = a + 1  # val documents one at a time: each may close the split
                else:
                    if writer.split == "val":
                        writer.flush(doc, 0)  # val ends at this document boundary
                    b = n
                    if budget is not None:
                        # stop after the document that meets the budget
                        reach = total + (offs[a + 1: n + 1] - offs[a])
                        b = a + min(int(np.searchsorted(reach, budget, side="left")) + 1, n - a)
                seg_start = int(offs[a]) + skip
                ends = offs[a + 1: b + 1] - seg_start
                writer.add("val" if is_val else "train", tokens[seg_start: int(offs[b])], ends, doc, skip)
                total += int(offs[b] - offs[a])
                run_tokens += int(offs[b]) - seg_start
                run_docs += b - a
                doc += b - a
                skip = 0
                a = b
            dt = max(time.perf_counter() - t_start, 1e-9)
            bar.update(n if by_docs else int(offs[n]))
            bar.set_postfix_str(f"{run_tokens / dt / 1e6:.2f}M tok/s" if by_docs else f"{run_docs / dt:.0f} doc/s",
                                refresh=False)
            if done():
                break
        writer.flush(doc, 0)
    finally:
        bar.close()
    return tokenized
