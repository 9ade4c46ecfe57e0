"""The content fingerprint of a prepared dataset: a resume refuses data other than the run's."""

from __future__ import annotations

import hashlib
from pathlib import Path

from gptlab.data import shards as sh

SAMPLES_PER_SHARD = 16  # blocks read from each shard for the fingerprint
SAMPLE_BYTES = 4096


def data_fingerprint(data_dir: str | Path) -> str:
    """A digest of a prepared dataset's content, cheap at any size: every shard's name, split and
    token count, its manifest sha256 (the whole file, recorded by prepare) when there is one, and
    SAMPLES_PER_SHARD evenly spaced blocks of its bytes, the first and the last included."""
    h = hashlib.sha256()
    for s in sh.open_dataset(data_dir).shards:
        h.update(f"{s.path.name}|{s.split}|{s.tokens}|{s.sha256 or ''}|".encode())
        size = s.path.stat().st_size
        step = max(1, (size - SAMPLE_BYTES) // max(1, SAMPLES_PER_SHARD - 1))
        offsets = sorted({min(i * step, max(0, size - SAMPLE_BYTES)) for i in range(SAMPLES_PER_SHARD)})
        with open(s.path, "rb") as f:
            for off in offsets:
                f.seek(off)
                h.update(f.read(SAMPLE_BYTES))
    return h.hexdigest()[:32]
