"""Atomic file-system writes shared by every format owner: things appear whole or not at all.
No torch here (data preparation uses it)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path


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
