"""A stall watchdog (--stall-timeout): a thread per rank, fed a heartbeat by the training loop.
When no heartbeat comes for `timeout` seconds (outside the windows it is paused for), it writes the
Python stack of every thread of this process to RUN/stalls/rank{R}-{time}.txt and ends the process
with EXIT_CODE, so that a launcher (torchrun --max-restarts, a scheduler's requeue) restarts the
job and `--resume auto` continues it from the latest checkpoint.

A rank stopped by the OS, or stuck outside a collective, cannot report itself; the ranks waiting
for it in the next collective then stall, and their watchdogs fire. The process is ended with
os._exit: a stalled main thread can hold locks that a normal exit would wait for.
"""

from __future__ import annotations

import faulthandler
import os
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

EXIT_CODE = 3
"""The exit status of a process that the watchdog ended (distinct from 1, a failure, and 2, a user error)."""

DEFAULT_TIMEOUT = 1800.0
"""--stall-timeout for multi-rank runs when not given (single-process runs have none by default)."""


class Watchdog:
    """`with Watchdog(timeout, directory, rank):` watches the block: beat() after each unit of
    progress; `with paused():` for a window that may legitimately take longer (nestable)."""

    def __init__(self, timeout: float, directory: Path | str, rank: int = 0, what: str = "step"):
        if timeout <= 0:
            raise ValueError("a watchdog needs a positive timeout")
        self.timeout, self.directory, self.rank, self.what = float(timeout), Path(directory), rank, what
        self._lock = threading.Lock()
        self._last = time.monotonic()
        self._paused = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.fired_path: Path | None = None

    def beat(self) -> None:
        with self._lock:
            self._last = time.monotonic()

    @contextmanager
    def paused(self) -> Iterator[None]:
        with self._lock:
            self._paused += 1
        try:
            yield
        finally:
            with self._lock:
                self._paused -= 1
                self._last = time.monotonic()  # the time budget starts again after the window

    def start(self) -> "Watchdog":
        self.beat()
        self._thread = threading.Thread(target=self._watch, name="gptlab-watchdog", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def __enter__(self) -> "Watchdog":
        global _active
        self.start()
        self._previous, _active = _active, self
        return self

    def __exit__(self, *exc) -> None:
        global _active
        _active = self._previous
        self.stop()

    def _overdue(self) -> float | None:
        """Seconds since the last heartbeat when they exceed the timeout (and not paused), else None."""
        with self._lock:
            idle = time.monotonic() - self._last
            return idle if self._paused == 0 and idle >= self.timeout else None

    def _watch(self) -> None:
        tick = min(1.0, self.timeout / 10)
        while not self._stop.wait(tick):
            idle = self._overdue()
            if idle is not None:
                self.fire(idle)
                return

    def fire(self, idle: float, exit: bool = True) -> Path | None:
        """Write every thread's stack to the stalls directory, say so on stderr, end the process."""
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
        path = self.directory / f"rank{self.rank}-{stamp}-{os.getpid()}.txt"
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            with open(path, "w", encoding="utf-8") as f:
                f.write(f"gptlab stall watchdog: rank {self.rank} (pid {os.getpid()}): no {self.what} finished "
                        f"in {idle:.0f} s (--stall-timeout {self.timeout:g}); the stacks of its threads:\n\n")
                f.flush()
                faulthandler.dump_traceback(f, all_threads=True)
                f.flush()
                os.fsync(f.fileno())
            where = f"its Python stacks are in {path}"
        except OSError as e:  # a full or stuck disk may be the very cause: the stacks go to stderr
            where = f"its stacks could not be written to {path} ({e}), so they follow"
            path = None
        self.fired_path = path
        try:
            print(f"gptlab: rank {self.rank}: no {self.what} finished in {idle:.0f} s (--stall-timeout "
                  f"{self.timeout:g}); {where}; exiting with status {EXIT_CODE} so that the launcher restarts "
                  f"the job (`--resume auto` continues it)", file=sys.stderr, flush=True)
            if path is None:
                faulthandler.dump_traceback(sys.stderr, all_threads=True)
        except Exception:
            pass
        if exit:
            os._exit(EXIT_CODE)
        return path


_active: Watchdog | None = None


def beat() -> None:
    """Feed the active watchdog of this process, if any."""
    w = _active
    if w is not None:
        w.beat()


@contextmanager
def paused() -> Iterator[None]:
    """Keep the active watchdog (if any) from firing during this block."""
    w = _active
    if w is None:
        yield
        return
    with w.paused():
        yield


def timeout_for(stall_timeout: float | None, world_size: int) -> float:
    """The watchdog's timeout for --stall-timeout (None: DEFAULT_TIMEOUT with several ranks, none with
    one); 0 means no watchdog."""
    if stall_timeout is None:
        return DEFAULT_TIMEOUT if world_size > 1 else 0.0
    return float(stall_timeout)
