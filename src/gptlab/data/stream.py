"""Remote token shards: list them, fetch them ahead into a bounded cache, delete them once used.

Two kinds of source stand where a dataset directory may stand (`--data`, `gptlab data`):

    http(s)://HOST/PATH              a prepared dataset directory served over HTTP: PATH/manifest.json
                                     and the shards it lists (as `gptlab prepare` writes them)
    hf://datasets/OWNER/NAME[/DIR]   a Hugging Face dataset repo (optionally @REVISION after NAME):
                                     its manifest.json if DIR holds one, else its llm.c `.bin` shards,
                                     whose token counts come from their headers (range requests)

A ShardStream keeps the shards one process needs in its own cache directory. A background thread
fetches them ahead in the order the loader will use them; each one goes to `.NAME.tmp-PID`, is
verified (size, header, and the manifest's sha256 and document count, or the header and the
listed size for hub shards without a manifest) and only then renamed to `NAME`, so a partly
downloaded or damaged shard is never read. A shard is deleted as soon as the loader moves past it.
Space is reserved before a download starts: the val split (kept for evaluations) plus the shards
in use, on disk and being fetched never exceed the disk budget. Failures (unreachable host, HTTP
errors, truncated or corrupt downloads, socket timeouts) are retried with exponential backoff, then
become one UserError; nothing waits without a timeout.

This module does not import torch; the shard layout and manifest stay in gptlab.data.shards.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import json
import os
import re
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from gptlab import downloads
from gptlab.atomic import replaced_file, sha256_file, temp_path
from gptlab.data import shards as sh
from gptlab.errors import UserError

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; one process per cache directory is then up to the user
    fcntl = None

REMOTE_PREFIXES = ("http://", "https://", "hf://")
DEFAULT_BUDGET = "10G"
DEFAULT_AHEAD = 4  # shards fetched ahead of the one in use, when the budget has room
_SUFFIXES = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def is_remote(data: Any) -> bool:
    return isinstance(data, str) and data.startswith(REMOTE_PREFIXES)


def parse_size(value: int | str) -> int:
    """Bytes from an int or a size such as 500M, 1.5G, 20K, 2GiB (K/M/G/T are powers of 1024)."""
    if isinstance(value, int) and not isinstance(value, bool):
        n = value
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?)(?:I?B)?\s*", str(value).upper())
        if not m:
            raise UserError(f"expected a size such as 500M, 2G or 1048576, got {value!r}")
        n = int(float(m.group(1)) * _SUFFIXES[m.group(2)])
    if n <= 0:
        raise UserError(f"a disk budget must be positive, got {value!r}")
    return n


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def default_cache() -> Path:
    """$GPTLAB_CACHE/data, else ~/.cache/gptlab/data."""
    return downloads.cache_dir() / "data"


# ------------------------------------------------------------------------------------------ HTTP
@dataclass(frozen=True)
class Retry:
    """How hard to try: attempts per request, first backoff (doubling, capped at 30 s), socket timeout."""

    attempts: int = 5
    backoff: float = 1.0
    timeout: float = 30.0

    @classmethod
    def from_env(cls) -> "Retry":
        """Defaults, overridden by $GPTLAB_STREAM_RETRIES, $GPTLAB_STREAM_BACKOFF, $GPTLAB_STREAM_TIMEOUT."""
        env = os.environ
        try:
            return cls(attempts=max(1, int(env.get("GPTLAB_STREAM_RETRIES", cls.attempts))),
                       backoff=float(env.get("GPTLAB_STREAM_BACKOFF", cls.backoff)),
                       timeout=float(env.get("GPTLAB_STREAM_TIMEOUT", cls.timeout)))
        except ValueError as e:
            raise UserError(f"$GPTLAB_STREAM_*: {e}") from None

    def delays(self) -> Iterator[float]:
        """The pause before each attempt: 0, then backoff, 2*backoff, ..."""
        yield 0.0
        for i in range(self.attempts - 1):
            yield min(30.0, self.backoff * 2**i)


class _Stopped(Exception):
    """The stream was closed while a download was under way."""


class _KeepAuthOnSameHost(urllib.request.HTTPRedirectHandler):
    """Follow redirects, but drop the Authorization header when one leads to another host (a CDN)."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        new = super().redirect_request(req, fp, code, msg, headers, newurl)
        if new is not None and urllib.parse.urlsplit(newurl).netloc != urllib.parse.urlsplit(req.full_url).netloc:
            new.remove_header("Authorization")
        return new


_OPENER = urllib.request.build_opener(_KeepAuthOnSameHost())


def _describe(e: BaseException, timeout: float) -> str:
    if isinstance(e, urllib.error.HTTPError):
        return f"HTTP {e.code} {e.reason}"
    if isinstance(e, urllib.error.URLError):
        reason = e.reason
        if isinstance(reason, TimeoutError):
            return f"no answer within {timeout:g} s"
        return f"cannot connect ({getattr(reason, 'strerror', None) or reason})"
    if isinstance(e, TimeoutError):
        return f"no data within {timeout:g} s"
    if isinstance(e, UserError):
        return str(e)
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    if isinstance(e, http.client.IncompleteRead):
        return f"connection closed early ({len(e.partial)} bytes read)"
    return f"{type(e).__name__}: {e}" if str(e) else type(e).__name__


def with_retries(what: str, fn: Callable[[], Any], retry: Retry, stop: threading.Event | None = None) -> Any:
    """fn() until it succeeds; network and verification errors are retried with backoff, then
    become one UserError naming `what`."""
    last = ""
    for delay in retry.delays():
        if delay and (stop.wait(delay) if stop is not None else time.sleep(delay)):
            raise _Stopped
        try:
            return fn()
        except _Stopped:
            raise
        except (OSError, http.client.HTTPException, UserError, ValueError) as e:
            last = _describe(e, retry.timeout)
    raise UserError(f"{what}: {last} (gave up after {retry.attempts} attempts)")


def _open(url: str, headers: dict[str, str], timeout: float, byte_range: tuple[int, int] | None = None):
    req = urllib.request.Request(url, headers=dict(headers))
    if byte_range is not None:
        req.add_header("Range", f"bytes={byte_range[0]}-{byte_range[1] - 1}")
    return _OPENER.open(req, timeout=timeout)


def fetch_bytes(url: str, headers: dict[str, str], retry: Retry, limit: int | None = None) -> bytes:
    """The body of url (its first `limit` bytes, asked for with a range request)."""
    def once() -> bytes:
        with _open(url, headers, retry.timeout, None if limit is None else (0, limit)) as r:
            body = r.read() if limit is None else r.read(limit)
        if limit is not None and len(body) < limit:
            raise UserError(f"only {len(body)} of the first {limit} bytes came back")
        return body
    return with_retries(url, once, retry)


# --------------------------------------------------------------------------------------- sources
@dataclass
class RemoteDataset:
    """A listed remote dataset: its shards (sh.Entry), their URLs, its manifest (None for hub shards)."""

    where: str
    entries: list[sh.Entry]
    urls: dict[str, str]
    manifest: dict[str, Any] | None
    headers: dict[str, str] = field(default_factory=dict)

    def split(self, name: str) -> list[sh.Entry]:
        return [e for e in self.entries if e.split == name]


def open_remote(source: str, retry: Retry | None = None) -> RemoteDataset:
    retry = retry or Retry.from_env()
    if source.startswith("hf://"):
        return _open_hub(source, retry)
    base = source.rstrip("/")
    raw = fetch_bytes(f"{base}/{sh.MANIFEST}", {}, retry)
    return _from_manifest(source, raw, lambda name: f"{base}/{urllib.parse.quote(name)}", {})


def _from_manifest(source: str, raw: bytes, url_of: Callable[[str], str], headers: dict[str, str]) -> RemoteDataset:
    where = f"{source.rstrip('/')}/{sh.MANIFEST}"
    try:
        m = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{where}: not valid JSON ({e})") from None
    entries = sh.manifest_entries(sh.check_manifest(m, where))
    if not entries:
        raise UserError(f"{where}: the manifest lists no shards")
    return RemoteDataset(source, entries, {e.file: url_of(e.file) for e in entries}, m, headers)


def parse_hub(source: str) -> tuple[str, str | None, str]:
    """hf://datasets/OWNER/NAME[@REV][/DIR] -> (OWNER/NAME, REV or None, DIR or '')."""
    m = re.fullmatch(r"hf://datasets/([^/@]+)/([^/@]+)(?:@([^/]+))?(?:/(.*))?", source.rstrip("/"))
    if not m:
        raise UserError(f"{source}: expected hf://datasets/OWNER/NAME[/DIR] (a Hugging Face dataset repo)")
    return f"{m.group(1)}/{m.group(2)}", m.group(3), (m.group(4) or "").strip("/")


def _hub_listing(source: str, repo: str, rev: str | None, sub: str, endpoint: str, retry: Retry) -> dict[str, int]:
    """{file name: size} of the files directly in DIR, listed with huggingface_hub."""
    from huggingface_hub import HfApi
    from huggingface_hub.hf_api import RepoFile

    def once() -> dict[str, int]:
        try:
            items = HfApi(endpoint=endpoint).list_repo_tree(repo, path_in_repo=sub or None, repo_type="dataset",
                                                            revision=rev)
            return {it.path.rsplit("/", 1)[-1]: int(it.size) for it in items if isinstance(it, RepoFile)}
        except (OSError, UserError, ValueError):
            raise
        except Exception as e:  # huggingface_hub's and its HTTP client's errors: retried like ours
            raise UserError(str(e).splitlines()[0] if str(e) else type(e).__name__) from None
    return with_retries(f"{source}: listing files", once, retry)


def _open_hub(source: str, retry: Retry) -> RemoteDataset:
    from huggingface_hub import constants, hf_hub_url
    from huggingface_hub.utils import build_hf_headers

    repo, rev, sub = parse_hub(source)
    # read at call time (not huggingface_hub's import time), so HF_ENDPOINT set later is honoured
    endpoint = os.environ.get("HF_ENDPOINT", constants.ENDPOINT).rstrip("/")
    files = _hub_listing(source, repo, rev, sub, endpoint, retry)
    headers = dict(build_hf_headers())

    def url_of(name: str) -> str:
        return hf_hub_url(repo, f"{sub}/{name}" if sub else name, repo_type="dataset", revision=rev,
                          endpoint=endpoint)
    if sh.MANIFEST in files:
        return _from_manifest(source, fetch_bytes(url_of(sh.MANIFEST), headers, retry), url_of, headers)
    names = sorted(n for n in files if n.endswith(".bin") and sh.split_from_name(n) is not None)
    if not names:
        raise UserError(f"{source}: no token shards (*.bin with 'train' or 'val' in the name, or a manifest.json)")

    def entry(name: str) -> sh.Entry:
        raw = fetch_bytes(url_of(name), headers, retry, limit=sh.HEADER_BYTES)
        n = sh.parse_header(raw, files[name], f"{source}/{name}")  # the listed size must match the header
        return sh.Entry(name, sh.split_from_name(name), n)
    with ThreadPoolExecutor(8) as pool:  # one small range request per shard, a few at a time
        entries = list(pool.map(entry, names))
    return RemoteDataset(source, entries, {n: url_of(n) for n in names}, None, headers)


# ---------------------------------------------------------------------------------- downloading
def download(ds: RemoteDataset, entry: sh.Entry, dest: Path, retry: Retry,
             stop: threading.Event | None = None) -> None:
    """Fetch one shard to dest through a temporary file, verified before the rename; retried."""
    def once() -> None:
        with replaced_file(dest, "wb") as f:
            _stream_into(ds, entry, retry.timeout, f.write, stop)
    with_retries(f"{ds.where}: shard {entry.file}", once, retry, stop)


def _stream_into(ds: RemoteDataset, entry: sh.Entry, timeout: float, sink: Callable[[bytes], Any],
                 stop: threading.Event | None = None, progress: Callable[[int], Any] | None = None) -> None:
    """Read one shard's body into sink, checking its size, header, sha256 and documents."""
    digest = sh.Digest()
    head = b""
    with _open(ds.urls[entry.file], ds.headers, timeout) as r:
        while block := r.read(1 << 18):
            if stop is not None and stop.is_set():
                raise _Stopped
            if digest.seen + len(block) > entry.size:
                raise UserError(f"longer than the {entry.size} bytes expected")
            if len(head) < sh.HEADER_BYTES:
                head += block[: sh.HEADER_BYTES - len(head)]
            digest.update(block)
            sink(block)
            if progress is not None:
                progress(len(block))
    if digest.seen != entry.size:
        raise UserError(f"truncated download ({digest.seen} of {entry.size} bytes)")
    n = sh.parse_header(head, digest.seen, entry.file)
    if n != entry.tokens:
        raise UserError(f"holds {n} tokens but the listing says {entry.tokens}")
    sh.check_digest(entry.file, entry, digest.hexdigest(), digest.eots if entry.sha256 else None)


def summary(source: str) -> dict[str, Any]:
    """`gptlab data info` for a directory, a URL or hf://."""
    if not is_remote(source):
        return sh.dataset_summary(source)
    ds = open_remote(source)
    return sh.summarize(source, ds.entries, ds.manifest)


def verify(source: str, progress: bool = True) -> dict[str, Any]:
    """`gptlab data verify`: every remote shard is read once and checked, nothing is written to disk."""
    if not is_remote(source):
        return sh.verify_dataset(source, progress=progress)
    from tqdm import tqdm

    retry = Retry.from_env()
    ds = open_remote(source, retry)
    with tqdm(total=sum(e.size for e in ds.entries), unit="B", unit_scale=True, desc="verify",
              disable=None if progress else True) as bar:
        for e in ds.entries:
            with_retries(f"{source}: shard {e.file}",
                         lambda e=e: _stream_into(ds, e, retry.timeout, lambda b: None, progress=bar.update), retry)
    return {"directory": source, "shards": len(ds.entries), "hashed": ds.manifest is not None,
            "tokens": sum(e.tokens for e in ds.entries)}


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
                        download(self.ds, e, path, self.retry)
                self._val_ready = True
        return [self.dir / e.file for e in self.val]

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
                download(self.ds, self.train[s], self.dir / self.train[s].file, self.retry, self._stop)
                with self._cv:
                    self._files[s].ready = True
                    if self._files[s].refs == 0:
                        self._drop(s)
                    self._cv.notify_all()
        except _Stopped:
            return
        except UserError as e:
            self._fail(e)
        except Exception as e:  # a bug or a full disk: still one line for the user, never a hang
            self._fail(UserError(f"{self.ds.where}: fetching shards failed: {_describe(e, self.retry.timeout)}"))

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
        if _OPEN.get(self.ds.where) is self:
            del _OPEN[self.ds.where]
        key = self.dir.resolve()
        if _BY_DIR.get(key) is self:
            del _BY_DIR[key]
        if not self._lock_file.closed:
            self._lock_file.close()


# ------------------------------------------------------------------------------ the registry
# Streams opened by train loaders, by source: evaluations in the same process read the val
# split from them (iter_val_batches(cfg.data) during training) instead of fetching it again.
_OPEN: dict[str, ShardStream] = {}
_BY_DIR: dict[Path, ShardStream] = {}


def open_stream(source: str, *, cache: str | Path | None, budget: int | str | None, rank: int = 0,
                world_size: int = 1, ahead: int = DEFAULT_AHEAD, retry: Retry | None = None) -> ShardStream:
    """A train stream of one rank: its own directory (rank<r>) and budget / world_size of the disk."""
    retry = retry or Retry.from_env()
    ds = open_remote(source, retry)
    if not ds.split("train"):
        have = ", ".join(sorted({e.split for e in ds.entries})) or "none"
        raise UserError(f"{source}: no train split (splits present: {have})")
    total = parse_size(budget if budget is not None else DEFAULT_BUDGET)
    directory = cache_dir(cache, source) / f"rank{rank}"
    old = _BY_DIR.pop(directory.resolve(), None)
    if old is not None:  # a newer loader of this process takes the directory over
        old.close()
    stream = ShardStream(ds, directory, total // world_size, retry=retry, ahead=ahead)
    _OPEN[source] = _BY_DIR[directory.resolve()] = stream
    return stream


def val_split(source: str) -> list[sh.Shard]:
    """The val shards of a remote source on local disk: from the stream a train loader opened for
    it in this process, else fetched once into the default cache's `val` directory."""
    stream = _OPEN.get(source)
    if stream is None:
        retry = Retry.from_env()
        ds = open_remote(source, retry)
        stream = ShardStream(ds, cache_dir(None, source) / "val", parse_size(DEFAULT_BUDGET), retry=retry,
                             blocking_lock=True, train=False)
        try:
            paths = stream.val_paths()
        finally:
            stream.close()
    else:
        paths = stream.val_paths()
    return [sh.Shard(p, "val", e.tokens, e.documents, e.sha256) for p, e in zip(paths, stream.val)]
