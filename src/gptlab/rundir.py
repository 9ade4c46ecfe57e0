"""The ONLY code that knows a run directory's layout:

    RUN/config.json              the full resolved configuration {"model": ..., "train": ...}
    RUN/metrics.jsonl            one JSON object a line (metrics.py writes the records)
    RUN/checkpoints/step_NNNNNN  checkpoint directories (checkpoint.py knows what is inside one)
    RUN/checkpoints/latest       text file naming the newest good checkpoint
    RUN/samples.txt              samples drawn during training
    RUN/plots/*.png              charts (plot.py draws them)
    RUN/.lock                    held (flock) by the one process writing the run

A checkpoint directory appears whole (checkpoint.py writes it under a temporary name and renames
it), so every step_* directory here is complete; `latest` is moved only after that. Temporary
names are atomic.py's one spelling (.NAME.tmp-PID); remove_stale_temps() clears them at startup,
and the spellings of earlier versions too.
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
from pathlib import Path
from typing import Any

from gptlab.atomic import remove_dir, remove_leftovers, write_json, write_text
from gptlab.config import read_json
from gptlab.errors import UserError

CONFIG = "config.json"
METRICS = "metrics.jsonl"
CHECKPOINTS = "checkpoints"
LATEST = "latest"
SAMPLES = "samples.txt"
PLOTS = "plots"
TENSORBOARD = "tensorboard"
LOCK = ".lock"
STEP_PREFIX = "step_"

# what earlier versions' writers left (before atomic.py's one spelling), by directory: only these
# exact shapes are known to be gptlab's
_OLD_TEMPS_CHECKPOINTS = re.compile(r"\.tmp-(deleting-)?step_\d+-\d+|\.step_\d+\.old-\d+|\.latest\.tmp")
_OLD_TEMPS_RUN = re.compile(r"(config\.json|metrics\.jsonl)\.tmp")
# the run directory may be one the user shares with other files: only its own files' temporaries
_RUN_FILES = re.compile("|".join(re.escape(n) for n in (CONFIG, METRICS, SAMPLES)))
_OLD_TEMPS_PLOTS = re.compile(r"\..+\.png\.\d+\.tmp")


class RunDir:
    """A run directory: where each of its files lives, and the lock on it."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._lock_fd: int | None = None

    # ------------------------------------------------------------------ paths
    @property
    def config_path(self) -> Path:
        return self.path / CONFIG

    @property
    def metrics_path(self) -> Path:
        return self.path / METRICS

    @property
    def samples_path(self) -> Path:
        return self.path / SAMPLES

    @property
    def plots_dir(self) -> Path:
        return self.path / PLOTS

    @property
    def tensorboard_dir(self) -> Path:
        return self.path / TENSORBOARD

    @property
    def checkpoints_dir(self) -> Path:
        return self.path / CHECKPOINTS

    def checkpoint_path(self, step: int) -> Path:
        return self.checkpoints_dir / f"{STEP_PREFIX}{step:06d}"

    # ------------------------------------------------------------------ config
    def create(self) -> None:
        if self.path.exists() and not self.path.is_dir():
            raise UserError(f"{self.path}: exists and is not a directory; choose another --out")
        self.path.mkdir(parents=True, exist_ok=True)

    def has_config(self) -> bool:
        return self.config_path.is_file()

    def read_config(self) -> dict[str, Any]:
        saved = read_json(self.config_path)
        if not isinstance(saved.get("train"), dict):
            raise UserError(f"{self.config_path}: not a gptlab run config")
        return saved

    def write_config(self, model: dict[str, Any], train: dict[str, Any]) -> None:
        write_json(self.config_path, {"model": model, "train": train})

    # ------------------------------------------------------------------ checkpoints
    def is_run(self) -> bool:
        return self.checkpoints_dir.is_dir()

    def checkpoints(self) -> list[Path]:
        """Every complete checkpoint, oldest first."""
        if not self.checkpoints_dir.is_dir():
            return []
        return sorted(p for p in self.checkpoints_dir.glob(f"{STEP_PREFIX}*") if p.is_dir())

    def latest_checkpoint(self) -> Path | None:
        """The checkpoint `latest` names (inside this run), else the newest one, else None."""
        pointer = self.checkpoints_dir / LATEST
        if pointer.is_file():
            name = pointer.read_text(encoding="utf-8", errors="replace").strip()
            ckpt = self.checkpoints_dir / name
            if name.startswith(STEP_PREFIX) and "/" not in name and ckpt.is_dir():
                return ckpt
        found = self.checkpoints()
        return found[-1] if found else None

    def mark_latest(self, ckpt: Path) -> None:
        """Point `latest` at ckpt, atomically and durably."""
        write_text(self.checkpoints_dir / LATEST, ckpt.name + "\n")

    def prune(self, keep: int) -> None:
        """Keep the newest `keep` checkpoints (0 keeps all), and always the one `latest` names.
        A checkpoint is renamed to a temporary name before it is deleted (atomic.remove_dir), so a
        kill halfway through never leaves a partial step_* directory that looks complete."""
        if keep <= 0:
            return
        latest = self.latest_checkpoint()
        for old in self.checkpoints()[:-keep]:
            if old != latest:
                remove_dir(old)

    # ------------------------------------------------------------------ the lock
    def lock(self) -> None:
        """Take the run's single-writer lock (flock: released by the OS when the process dies, so a
        stale lock file never blocks). Another live process holding it is one clear error."""
        self.create()
        fd = os.open(self.path / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = os.read(fd, 64).decode(errors="replace").strip() or "another process"
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EACCES):
                raise UserError(f"{self.path} is in use by process {holder}; wait for it to finish "
                                f"or choose another --out") from None
            raise UserError(f"{self.path}: cannot lock the run directory ({e.strerror})") from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._lock_fd = fd

    def remove_stale_temps(self) -> list[Path]:
        """Remove what a killed writer left behind; call it holding the lock. In checkpoints/ and
        plots/: every temporary (.NAME.tmp-PID: an unfinished save, `latest` or chart; a replaced
        or pruned checkpoint not yet deleted); in the run directory, those of the run's own files
        (.config.json.tmp-PID, ...); and the temporaries of earlier versions (.tmp-step_*-PID,
        .step_*.old-PID, .latest.tmp, config.json.tmp, ...). Returns what was removed."""
        return (remove_leftovers(self.path, _OLD_TEMPS_RUN, targets=_RUN_FILES)
                + remove_leftovers(self.checkpoints_dir, _OLD_TEMPS_CHECKPOINTS)
                + remove_leftovers(self.plots_dir, _OLD_TEMPS_PLOTS))

    def start_fresh_logs(self) -> None:
        """A new run in this directory (no checkpoint to continue) starts its own metrics and
        samples instead of appending to what an earlier run left."""
        for p in (self.metrics_path, self.samples_path):
            p.unlink(missing_ok=True)

    def unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing releases the flock
            self._lock_fd = None
