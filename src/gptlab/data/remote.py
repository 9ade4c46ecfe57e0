"""Remote datasets: what stands where a dataset directory may stand (`--data`, `gptlab data`), how
its shards are listed, and fetching one shard verified.

    http(s)://HOST/PATH              a prepared dataset directory served over HTTP: PATH/manifest.json
                                     and the shards it lists (as `gptlab prepare` writes them)
    hf://datasets/OWNER/NAME[/DIR]   a Hugging Face dataset repo (optionally @REVISION after NAME):
                                     its manifest.json if DIR holds one, else its llm.c `.bin` shards,
                                     whose token counts come from their headers (range requests)

A shard download goes to `.NAME.tmp-PID`, is verified (size, header, and the manifest's sha256 and
document count, or the header and the listed size for hub shards without a manifest) and only then
renamed to `NAME`, so a partly downloaded or damaged shard is never read. Requests go through
gptlab.net (retried with backoff, then one UserError). `gptlab data info/verify` live here too.

This module does not import torch; the shard layout and manifest stay in gptlab.data.shards.
"""

from __future__ import annotations

import json
import os
import re
import threading
import urllib.parse
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from gptlab.atomic import replaced_file
from gptlab.data import shards as sh
from gptlab.errors import UserError
from gptlab.net import Retry, Stopped, fetch_bytes, open_url, with_retries

REMOTE_PREFIXES = ("http://", "https://", "hf://")


def is_remote(data: Any) -> bool:
    """Whether `data` names a remote dataset (a URL or hf://) rather than a directory."""
    return isinstance(data, str) and data.startswith(REMOTE_PREFIXES)


# --------------------------------------------------------------------------------------- listing
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



# ---------------------------------------------------------------------------------- one shard
def download_shard(ds: RemoteDataset, entry: sh.Entry, dest: Path, retry: Retry,
             stop: threading.Event | None = None) -> None:
    """Fetch one shard to dest through a temporary file (atomic.replaced_file), verified before
    the rename; retried."""
    def once() -> None:
        with replaced_file(dest, "wb") as f:
            _stream_into(ds, entry, retry.timeout, f.write, stop)
    with_retries(f"{ds.where}: shard {entry.file}", once, retry, stop)


def _stream_into(ds: RemoteDataset, entry: sh.Entry, timeout: float, sink: Callable[[bytes], Any],
                 stop: threading.Event | None = None, progress: Callable[[int], Any] | None = None) -> None:
    """Read one shard's body into sink, checking its size, header, sha256 and documents."""
    digest = sh.Digest()
    head = b""
    with open_url(ds.urls[entry.file], ds.headers, timeout) as r:
        while block := r.read(1 << 18):
            if stop is not None and stop.is_set():
                raise Stopped
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
