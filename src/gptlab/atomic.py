"""Atomic file-system writes, file digests and JSON reads, shared by every format owner: things appear whole
or not at all. No torch here (data preparation uses it).

Two ways to write; this is the ONLY module that renames a temporary into place (a test in
tests/test_atomic.py holds every other module to it):

    with replaced_file(path, "wb") as f: ...   a file: written to a temporary next to `path`,
                                                flushed, fsync'd, then os.replace()d over it
    with staged_dir(path) as tmp: ...           a directory: filled under a temporary name next to
                                                `path`, every file fsync'd, then renamed into place
                                                (StagedDir when the end comes later, in another call)

On an error nothing appears (the temporary is removed and the error goes on; a full disk is one
DiskFullError naming `path`'s disk), and an existing `path` stays as it was. write_bytes,
write_text and write_json are replaced_file for whole contents; remove_dir deletes a directory
without ever leaving a partial one under its own name.

Temporary names have ONE spelling, hidden, next to the target:

    .NAME.tmp-PID        e.g. checkpoints/.step_000100.tmp-4242, .config.json.tmp-4242

(NAME is the target's name, PID the writing process). The leading dot keeps it out of globs
such as step_* and *.bin. A directory being replaced or deleted is first renamed to the same
spelling, NAME extended by `.old` or `.deleting`. is_temporary() recognises the spelling and
remove_leftovers() clears a directory of what a killed writer left. Earlier versions spelt
temporaries four ways (.tmp-NAME-PID, NAME.tmp, .NAME.PID.tmp, .NAME.old-PID); the owners of a
directory pass the ones they wrote there to remove_leftovers (`also`), so old runs are cleaned too.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, Iterator

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


class NotWritableError(UserError):
    """A write refused by the file system (read-only, or no permission): one line naming the path
    and the disk it is on."""

    ERRNOS = (errno.EROFS, errno.EACCES, errno.EPERM)

    def __init__(self, path: str | Path, e: OSError | None = None):
        self.path = Path(path)
        self.mount = mount_point(self.path)
        why = "read-only file system" if e is not None and e.errno == errno.EROFS else "permission denied"
        super().__init__(f"cannot write {self.path}: {why} (the disk mounted at {self.mount}); "
                         f"choose another --out")


def file_mode() -> int:
    """The mode a new file gets here (0o666 less the umask), for files a library creates 0600."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


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


# ----------------------------------------------------------------------------- temporary names

_TEMPORARY = re.compile(r"\.(.+)\.tmp-\d+")


def temp_name(name: str) -> str:
    """The temporary name under which this process writes `name`: .NAME.tmp-PID."""
    return f".{name}.tmp-{os.getpid()}"


def temp_path(path: str | Path) -> Path:
    """The temporary sibling under which this process writes `path`."""
    path = Path(path)
    return path.with_name(temp_name(path.name))


def is_temporary(name: str) -> bool:
    """Whether a file name is a temporary of the one spelling, .NAME.tmp-PID."""
    return _TEMPORARY.fullmatch(name) is not None


def remove_leftovers(directory: str | Path, also: re.Pattern | None = None,
                     targets: re.Pattern | None = None) -> list[Path]:
    """Remove every temporary (.NAME.tmp-PID, file or directory) directly inside `directory`, and
    every entry whose whole name `also` matches (the older spellings of what the caller writes
    there). With `targets`, only temporaries whose NAME it matches (a directory that may hold
    other programs' files). Returns what was removed, sorted. Call it only where no other writer
    is live (e.g. holding the directory's lock): a live writer's temporaries look the same."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    removed = []
    for p in sorted(directory.iterdir()):
        m = _TEMPORARY.fullmatch(p.name)
        if ((m and (targets is None or targets.fullmatch(m.group(1))))
                or (also is not None and also.fullmatch(p.name))):
            _remove(p)
            removed.append(p)
    return removed


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    else:
        p.unlink(missing_ok=True)


# ----------------------------------------------------------------------------- a replaced file

@contextmanager
def replaced_file(path: str | Path, mode: str = "wb", encoding: str = "utf-8") -> Iterator[IO]:
    """An open file ("wb" or "w") whose contents become `path` when the block ends without error:
    written under .NAME.tmp-PID, flushed and fsync'd, then os.replace()d over `path` (and the
    rename made durable). On an error the temporary is removed and `path` is untouched; a full
    disk is one DiskFullError naming `path`."""
    if mode not in ("w", "wb"):
        raise ValueError(f"replaced_file writes a whole file: mode 'w' or 'wb', not {mode!r}")
    path = Path(path)
    tmp = temp_path(path)
    try:
        with disk_full_guard(path):
            with open(tmp, mode, encoding=None if "b" in mode else encoding) as f:
                yield f
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a half-written temporary file would only take space
        raise
    fsync_dir(path.parent)


def write_bytes(path: str | Path, data: bytes) -> None:
    """Write `data` as `path`, whole or not at all."""
    with replaced_file(path, "wb") as f:
        f.write(data)


def write_text(path: str | Path, text: str) -> None:
    """Write `text` (UTF-8) as `path`, whole or not at all."""
    with replaced_file(path, "w") as f:
        f.write(text)


def write_json(path: str | Path, data: Any, sort_keys: bool = False) -> None:
    """Write JSON whole or not at all (a replaced file). sort_keys: equal data, equal bytes."""
    with replaced_file(path, "w") as f:
        json.dump(data, f, indent=2, sort_keys=sort_keys)
        f.write("\n")


# ----------------------------------------------------------------------------- a staged directory

class StagedDir:
    """A directory filled under the temporary name .NAME.tmp-PID next to `path`, then renamed
    into place whole by publish(), or removed by discard(). For a directory whose writing ends
    in another call than it began (a background save); staged_dir() is the one-block form."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.tmp = temp_path(self.path)

    def create(self) -> Path:
        """Make the (empty) temporary directory, replacing a stale one of this name; return it."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.tmp.exists():
            _remove(self.tmp)
        self.tmp.mkdir()
        return self.tmp

    def publish(self) -> Path:
        """fsync every file, then rename the temporary directory to `path` (see _replace_dir)."""
        with disk_full_guard(self.path):
            _replace_dir(self.tmp, self.path)
        return self.path

    def discard(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)


@contextmanager
def staged_dir(path: str | Path) -> Iterator[Path]:
    """A temporary directory next to `path`, to fill inside the block; when the block ends without
    error it is flushed and renamed to `path` whole (replacing an existing `path` only then). On an
    error it is removed and `path` is untouched; a full disk is one DiskFullError naming `path`."""
    stage = StagedDir(path)
    try:
        with disk_full_guard(stage.path):
            yield stage.create()
            stage.publish()
    except BaseException:
        stage.discard()
        raise


def _fsync_tree(root: Path) -> None:
    for parent, dirs, files in os.walk(root):
        for name in files:
            with open(os.path.join(parent, name), "rb") as fh:
                os.fsync(fh.fileno())
        for name in dirs:
            fsync_dir(os.path.join(parent, name))
    fsync_dir(root)


def _replace_dir(tmp: Path, path: Path) -> None:
    """Flush every file of the finished directory `tmp`, then rename it to `path`, replacing an
    existing `path` only once the new one is complete: the old one is first renamed aside
    (.NAME.old.tmp-PID) and deleted after, or put back if the last rename fails."""
    tmp, path = Path(tmp), Path(path)
    _fsync_tree(tmp)
    if path.exists():
        old = path.with_name(temp_name(f"{path.name}.old"))
        if old.exists():
            _remove(old)
        os.rename(path, old)
        try:
            os.rename(tmp, path)
        except BaseException:
            os.rename(old, path)  # put the old one back: `path` never goes missing on an error
            raise
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, path)
    fsync_dir(path.parent)


def remove_dir(path: str | Path) -> None:
    """Delete a directory without a kill ever leaving a partial one under its name: it is renamed
    to .NAME.deleting.tmp-PID first (which remove_leftovers clears), then deleted."""
    path = Path(path)
    doomed = path.with_name(temp_name(f"{path.name}.deleting"))
    os.rename(path, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def sha256_file(path: str | Path, chunk: int = 1 << 22) -> str:
    """The sha256 of a file's bytes, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def read_json(path: str | Path, max_bytes: int | None = None) -> dict[str, Any]:
    """A JSON object from a file; max_bytes refuses a file too large to be what it claims."""
    path = Path(path)
    try:
        if max_bytes is not None and path.stat().st_size > max_bytes:
            raise UserError(f"{path}: {path.stat().st_size:,} bytes, too large for this file "
                            f"(at most {max_bytes:,} expected)")
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise UserError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: cannot read: {e}") from None
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a JSON object")
    return data
