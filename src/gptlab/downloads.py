"""Downloads that users' data comes from: the cache directory, and fetching a URL into it with a
pinned sha256, whole or not at all (a partial or wrong download never looks like a cached copy).
The transfer goes through gptlab.net, retried like every other request. No torch here."""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

from tqdm import tqdm

from gptlab import net
from gptlab.atomic import replaced_file, sha256_file
from gptlab.errors import UserError

CACHE_ENV = "GPTLAB_CACHE"


def cache_dir(override: str | Path | None = None) -> Path:
    """Where downloads are kept: `override`, else $GPTLAB_CACHE, else ~/.cache/gptlab."""
    if override:
        return Path(override).expanduser()
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "gptlab"


def download(url: str, dest: Path, sha256: str | None, *, retry: net.Retry | None = None,
             show_progress: bool = False, hint: str = "") -> Path:
    """Fetch url to dest through a temporary file in the same folder (atomic.replaced_file); dest
    appears only once its sha256 matches (when one is given). Network errors are retried (retry:
    default net.Retry.from_env()); a wrong sha256 is not. `hint` ends the error message (what to do
    instead)."""
    retry = retry or net.Retry.from_env()
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tqdm(unit="B", unit_scale=True, unit_divisor=1024, desc=dest.name, file=sys.stderr,
              disable=not show_progress) as bar, replaced_file(dest, "wb") as f:
        h = hashlib.sha256()

        def once() -> None:  # each attempt starts the file, the hash and the bar over
            nonlocal h
            f.seek(0)
            f.truncate()
            h = hashlib.sha256()
            bar.reset()

            def sink(block: bytes) -> None:
                f.write(block)
                h.update(block)
                bar.update(len(block))

            def on_length(n: int | None) -> None:
                bar.total = n
                bar.refresh()
            net.read_into(url, {}, retry.timeout, sink, on_length=on_length, block=1 << 20)
        try:
            net.with_retries(f"cannot download {url}", once, retry)
        except UserError as e:
            raise UserError(f"{e}{hint}") from None
        got = h.hexdigest()
        if sha256 is not None and got != sha256:  # raised inside: the temporary is removed
            raise UserError(f"{url}: downloaded file has sha256 {got}, expected {sha256}")
    return dest


def fetch_cached(url: str, dest: Path, sha256: str, **kwargs) -> Path:
    """dest if it is already there with the right sha256, else download it (see `download`)."""
    if dest.exists():
        got = sha256_file(dest)
        if got != sha256:
            raise UserError(f"{dest}: cached file has sha256 {got}, expected {sha256}; delete it to download again")
        return dest
    return download(url, dest, sha256, **kwargs)
