"""Atomic file-system writes and file digests, shared by every format owner: things appear whole
or not at all. No torch here (data preparation uses it)."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from gptlab.errors import UserError

# errno values that mean "the disk (or the user's quota on it) is full"
FULL_DISK = (errno.ENOSPC, errno.EDQUOT)


class DiskFullError(UserError):
    """A write failed because the disk holding `path` is full: one line naming that disk."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.mount = mount_point(self.path)
        free = _free_bytes(self.mount)
        shown = "unknown" if free is None else f"{free / 2**20:.1f} MiB"
        super().__init__(f"no space left on the disk mounted at {self.mount} (free: {shown}) "
                         f"while writing {self.path}")


def mount_point(path: str | Path) -> Path:
    """The mount point of the file system holding `path` (or its nearest existing parent)."""
    p = Path(os.path.abspath(path))
    while not p.exists() and p != p.parent:
        p = p.parent
    while not os.path.ismount(p) and p != p.parent:
        p = p.parent
    return p


def _free_bytes(path: Path) -> int | None:
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return None


def is_disk_full(e: BaseException) -> bool:
    """An OSError for a full disk, also when a library wrapped it (its cause, or its message)."""
    seen = 0
    while e is not None and seen < 8:
        if isinstance(e, OSError) and e.errno in FULL_DISK:
            return True
        text = str(e)
        if "No space left on device" in text or "Disk quota exceeded" in text or "StorageFull" in text:
            return True
        e, seen = (e.__cause__ or e.__context__), seen + 1
    return False


@contextmanager
def disk_full_guard(path: str | Path) -> Iterator[None]:
    """Turn a full-disk failure of the writes inside into DiskFullError naming `path`'s disk."""
    try:
        yield
    except DiskFullError:
        raise
    except Exception as e:
        if is_disk_full(e):
            raise DiskFullError(path) from None
        raise


def fsync_dir(directory: str | Path) -> None:
    """Make a rename inside `directory` durable; not possible on every platform, harmless to skip there."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def replace_dir(tmp: Path, path: Path) -> None:
    """Flush every file of the finished directory `tmp`, then rename it to `path`, replacing an
    existing `path` only once the new one is complete."""
    for f in tmp.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    fsync_dir(tmp)
    if path.exists():
        old = path.with_name(f".{path.name}.old-{os.getpid()}")
        path.rename(old)
        tmp.rename(path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(path)
    fsync_dir(path.parent)


def write_json(path: str | Path, data: Any, sort_keys: bool = False) -> None:
    """Write JSON whole or not at all (temporary file, fsync, rename). sort_keys: equal data, equal bytes."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with disk_full_guard(tmp), open(tmp, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=2, sort_keys=sort_keys)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)  # a half-written temporary file would only take space
        raise
    os.replace(tmp, path)


def sha256_file(path: str | Path, chunk: int = 1 << 22) -> str:
    """The sha256 of a file's bytes, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
