"""Streamed token shards: fetch them ahead into a bounded cache, delete them once used.

A remote source (gptlab.data.remote: an http(s) URL or hf://) stands where a dataset directory may
stand. A ShardStream keeps the shards one process needs in its own cache directory. A background
thread fetches them ahead in the order the loader will use them; each download is verified before
it is renamed into place (remote.download_shard), so a partly downloaded or damaged shard is never
read. A shard is deleted as soon as the loader moves past it. Space is reserved before a download
starts: the val split (kept for evaluations) plus the shards in use, on disk and being fetched
never exceed the disk budget. Failures are retried with backoff (gptlab.net), then become one
UserError; nothing waits without a timeout.

The val split is handed out explicitly: ShardStream.val_split() for the stream a train loader
opened (TrainLoader.val_split()), val_split(source) for a source on its own.

This module does not import torch; the shard layout and manifest stay in gptlab.data.shards.
"""

from __future__ import annotations

import contextlib
import hashlib
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from gptlab import downloads
from gptlab.atomic import sha256_file, temp_path
from gptlab.data import shards as sh
from gptlab.data.remote import RemoteDataset, download_shard, open_remote
from gptlab.errors import UserError
from gptlab.net import Retry, Stopped, describe
from gptlab.units import human, parse_size

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; one process per cache directory is then up to the user
    fcntl = None

DEFAULT_BUDGET = "10G"
DEFAULT_AHEAD = 4  # shards fetched ahead of the one in use, when the budget has room


def default_cache() -> Path:
    """$GPTLAB_CACHE/data, else ~/.cache/gptlab/data."""
    return downloads.cache_dir() / "data"


# --------------------------------------------------------------------------------- the cache
def cache_dir(cache: str | Path | None, source: str) -> Path:
    """The directory of one source inside the cache: a readable name plus a hash of the source."""
    root = Path(cache).expanduser() if cache else default_cache()
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", source.split("://", 1)[-1]).strip("_")[-60:]
    return root / f"{name}-{hashlib.sha256(source.encode()).hexdigest()[:10]}"


def disk_usage(directory: Path) -> int:
    """Bytes of the files under directory (their sizes, as the budget counts them)."""
    total = 0
    for p in directory.rglob("*"):
        with contextlib.suppress(FileNotFoundError):
            if p.is_file():
                total += p.stat().st_size
    return total


@dataclass
class _File:
    refs: int
    ready: bool = False


class ShardStream:
    """One process's shards of a remote dataset: the val split on demand, train shards fetched
    ahead by a thread in the order `start(plan)` gives, each deleted when `get` moves past it."""

    def __init__(self, ds: RemoteDataset, directory: Path, budget: int, *, retry: Retry | None = None,
                 ahead: int = DEFAULT_AHEAD, blocking_lock: bool = False, train: bool = True) -> None:
        self.ds, self.dir, self.budget, self.ahead = ds, directory, budget, max(1, ahead)
        self.retry = retry or Retry.from_env()
        self.train = ds.split("train")
        self.val = ds.split("val")
        val_bytes = sum(e.size for e in self.val)
        two = sum(sorted((e.size for e in self.train), reverse=True)[:2]) if train else 0
        if budget < val_bytes + two:
            raise UserError(f"--data-disk-budget {human(budget)} is too small for {ds.where}: the val split "
                            f"({human(val_bytes)}) plus two train shards ({human(two)}) need {human(val_bytes + two)}")
        self.dir.mkdir(parents=True, exist_ok=True)
        self._lock_file = self._lock(blocking_lock)
        self._clean()
        self._cv = threading.Condition()
        self._reserved = val_bytes  # the val split's room is held from the start
        self._val_ready = False
        self._val_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._plan: Iterator[tuple[int, int]] = iter(())
        self._next: tuple[int, int] | None = None
        self._uses: dict[int, int] = {}  # admitted use -> train shard index, in plan order
        self._files: dict[int, _File] = {}  # train shard index -> its file's state
        self._error: UserError | None = None
        self.wait_seconds = 0.0  # time get() spent waiting for a shard: the prefetch's misses
        self.peak_reserved = self._reserved
        self._closed = False

    def _lock(self, blocking: bool):
        f = open(self.dir / ".lock", "w")
        if fcntl is not None:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
            except BlockingIOError:
                f.close()
                raise UserError(f"{self.dir} is in use by another gptlab process; "
                                f"give this run its own --data-cache") from None
        return f

    def _clean(self) -> None:
        """Remove what an earlier process left: partial downloads and train shards (val shards are
        kept and checked again before use)."""
        val = {e.file for e in self.val}
        for p in self.dir.iterdir():
            if p.name != ".lock" and p.name not in val:
                if p.is_file():
                    p.unlink()

    # ---------------------------------------------------------------------------- the val split
    def val_paths(self) -> list[Path]:
        """The val shards on local disk, fetched (and verified) on the first call."""
        with self._val_lock:
            if not self._val_ready:
                for e in self.val:
                    path = self.dir / e.file
                    if not (path.exists() and self._still_good(e, path)):
                        download_shard(self.ds, e, path, self.retry)
                self._val_ready = True
        return [self.dir / e.file for e in self.val]

    def val_split(self) -> list[sh.Shard]:
        """The val split as local shards (val_paths with the listing's counts)."""
        vocab = sh.manifest_vocab_size(self.ds.manifest)
        return [sh.Shard(p, "val", e.tokens, e.documents, e.sha256, vocab) for p, e in zip(self.val_paths(), self.val)]

    def _still_good(self, e: sh.Entry, path: Path) -> bool:
        try:
            if sh.read_header(path) != e.tokens:
                return False
            return e.sha256 is None or sha256_file(path) == e.sha256
        except UserError:
            return False

    # ------------------------------------------------------------------------- train prefetch
    def start(self, plan: Iterator[tuple[int, int]]) -> None:
        """Fetch train shards in plan order: (use, train shard index) with increasing use ids."""
        if self._closed:
            raise UserError(f"{self.ds.where}: this data stream was closed (a newer loader took over {self.dir})")
        self._halt()
        self._plan = plan
        self._next = next(plan, None)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="gptlab-shard-prefetch", daemon=True)
        self._thread.start()

    def _can_admit(self) -> bool:
        if self._next is None or len(self._uses) > self.ahead:  # the shard in use, and `ahead` more
            return False
        s = self._next[1]
        return s in self._files or self._reserved + self.train[s].size <= self.budget

    def _run(self) -> None:
        try:
            while True:
                with self._cv:
                    while not self._stop.is_set() and not self._can_admit():
                        self._cv.wait()
                    if self._stop.is_set():
                        return
                    use, s = self._next
                    self._next = next(self._plan, None)
                    self._uses[use] = s
                    if s in self._files:  # the same shard again (a small dataset): share its file
                        self._files[s].refs += 1
                        self._cv.notify_all()
                        continue
                    self._files[s] = _File(refs=1)
                    self._reserved += self.train[s].size
                    self.peak_reserved = max(self.peak_reserved, self._reserved)
                download_shard(self.ds, self.train[s], self.dir / self.train[s].file, self.retry, self._stop)
                with self._cv:
                    self._files[s].ready = True
                    if self._files[s].refs == 0:
                        self._drop(s)
                    self._cv.notify_all()
        except Stopped:
            return
        except UserError as e:
            self._fail(e)
        except Exception as e:  # a bug or a full disk: still one line for the user, never a hang
            self._fail(UserError(f"{self.ds.where}: fetching shards failed: {describe(e, self.retry.timeout)}"))

    def _fail(self, e: UserError) -> None:
        with self._cv:
            self._error = e
            self._cv.notify_all()

    def get(self, use: int) -> Path:
        """The local path of the shard of `use`, once fetched and verified; the shards of earlier
        uses are deleted first."""
        t0 = time.perf_counter()
        if self._closed:
            raise UserError(f"{self.ds.where}: this data stream was closed (a newer loader took over {self.dir})")
        with self._cv:
            for u in [u for u in self._uses if u < use]:
                self._release(u)
            self._cv.notify_all()
            while True:
                s = self._uses.get(use)
                if s is not None and self._files[s].ready:
                    self.wait_seconds += time.perf_counter() - t0
                    return self.dir / self.train[s].file
                if self._error is not None:
                    raise self._error
                planned = s is not None or (self._next is not None and self._next[0] <= use)
                if not planned or self._thread is None or not self._thread.is_alive():
                    raise UserError(f"{self.ds.where}: shard use {use} was never planned (a gptlab bug)")
                self._cv.wait(timeout=1.0)

    def _release(self, use: int) -> None:
        s = self._uses.pop(use)
        f = self._files[s]
        f.refs -= 1
        if f.refs == 0 and f.ready:  # (a file still downloading is dropped by _run when it is done)
            self._drop(s)

    def _drop(self, s: int) -> None:
        del self._files[s]
        with contextlib.suppress(FileNotFoundError):
            (self.dir / self.train[s].file).unlink()
        self._reserved -= self.train[s].size

    def _halt(self) -> None:
        """Stop the prefetch thread and delete every train shard."""
        self._stop.set()
        with self._cv:
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=self.retry.timeout + 5)
        with self._cv:
            for s in list(self._files):
                for p in (self.dir / self.train[s].file, temp_path(self.dir / self.train[s].file)):
                    with contextlib.suppress(FileNotFoundError):
                        p.unlink()
                self._reserved -= self.train[s].size
            self._files.clear()
            self._uses.clear()
            self._error = None

    def close(self) -> None:
        """Stop fetching, delete the train shards (the val split stays for later), unlock."""
        self._closed = True
        self._halt()
        key = self.dir.resolve()
        if _BY_DIR.get(key) is self:
            del _BY_DIR[key]
        if not self._lock_file.closed:
            self._lock_file.close()


# ------------------------------------------------------------------------------ opening
# The stream that holds each cache directory's lock in this process, so that a newer loader of the
# same directory can take it over (close the old one) instead of failing on the lock. Nothing is
# read through this table: the val split is handed out by the stream (ShardStream.val_split).
_BY_DIR: dict[Path, ShardStream] = {}


def open_stream(source: str, *, cache: str | Path | None, budget: int | str | None, rank: int = 0,
                world_size: int = 1, ahead: int = DEFAULT_AHEAD, retry: Retry | None = None) -> ShardStream:
    """A train stream of one rank: its own directory (rank<r>) and budget / world_size of the disk."""
    retry = retry or Retry.from_env()
    ds = open_remote(source, retry)
    if sh.is_chat(ds.manifest):  # its loss masks are not streamed: training on every token would be wrong
        raise UserError(f"{source}: a chat dataset (conversations with loss masks) is read from a local "
                        f"directory only; download it and give --data DIR")
    if not ds.split("train"):
        have = ", ".join(sorted({e.split for e in ds.entries})) or "none"
        raise UserError(f"{source}: no train split (splits present: {have})")
    tok = ((ds.manifest or {}).get("tokenizer") or {}).get("name", "gpt2")
    if tok != "gpt2":
        raise UserError(f"{source} was tokenized with {tok}; only GPT-2-tokenized data can be streamed "
                        f"so far: download the dataset directory and train from it")
    total = parse_size(budget if budget is not None else DEFAULT_BUDGET, "--data-disk-budget")
    directory = cache_dir(cache, source) / f"rank{rank}"
    old = _BY_DIR.pop(directory.resolve(), None)
    if old is not None:  # a newer loader of this process takes the directory over
        old.close()
    stream = ShardStream(ds, directory, total // world_size, retry=retry, ahead=ahead)
    _BY_DIR[directory.resolve()] = stream
    return stream


def val_split(source: str) -> list[sh.Shard]:
    """The val shards of a remote source on its own (no train loader: `gptlab eval --val URL`),
    fetched once into the default cache's `val` directory. A train loader's own stream hands out
    its copy instead (ShardStream.val_split, through TrainLoader.val_split)."""
    retry = Retry.from_env()
    ds = open_remote(source, retry)
    if sh.is_chat(ds.manifest):
        raise UserError(f"{source}: a chat dataset (conversations with loss masks) is read from a local "
                        f"directory only; download it and give its directory")
    stream = ShardStream(ds, cache_dir(None, source) / "val", parse_size(DEFAULT_BUDGET), retry=retry,
                         blocking_lock=True, train=False)
    try:
        return stream.val_split()
    finally:
        stream.close()
