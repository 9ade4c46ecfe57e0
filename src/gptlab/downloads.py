"""Downloads that users' data comes from: the cache directory, and fetching a URL into it with a
pinned sha256, whole or not at all (a partial or wrong download never looks like a cached copy).
No torch here."""

from __future__ import annotations

import hashlib
import os
import sys
import urllib.error
import urllib.request
from pathlib import Path

from tqdm import tqdm

from gptlab.atomic import replaced_file, sha256_file
from gptlab.errors import UserError

CACHE_ENV = "GPTLAB_CACHE"


def cache_dir(override: str | Path | None = None) -> Path:
    """Where downloads are kept: `override`, else $GPTLAB_CACHE, else ~/.cache/gptlab."""
    if override:
        return Path(override).expanduser()
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "gptlab"


def download(url: str, dest: Path, sha256: str | None, *, timeout: float = 60.0, show_progress: bool = False,
             hint: str = "") -> Path:
    """Fetch url to dest through a temporary file in the same folder (atomic.replaced_file); dest
    appears only once its sha256 matches (when one is given). `hint` ends the error message (what
    to do instead)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    h = hashlib.sha256()
    with replaced_file(dest, "wb") as f:
        try:
            with urllib.request.urlopen(url, timeout=timeout) as resp:
                total = int(resp.headers.get("Content-Length") or 0) or None
                with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=dest.name,
                          file=sys.stderr, disable=not show_progress) as bar:
                    while block := resp.read(1 << 20):
                        f.write(block)
                        h.update(block)
                        bar.update(len(block))
        except (urllib.error.URLError, OSError, ValueError) as e:
            reason = getattr(e, "reason", None) or e
            raise UserError(f"cannot download {url} ({reason}){hint}") from None
        got = h.hexdigest()
        if sha256 is not None and got != sha256:
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
