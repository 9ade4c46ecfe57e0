"""Checks that keep a run honest when something goes wrong: the content fingerprint of a dataset
(a resume refuses other data), the budget of non-finite steps (--skip-nonfinite), and the forward
pass that decides whether weights are good enough to be saved as a checkpoint."""

from __future__ import annotations

import hashlib
import math
import os
from pathlib import Path

import torch

from gptlab import dist
from gptlab.data import shards as sh
from gptlab.data.loader import TrainLoader
from gptlab.errors import UserError
from gptlab.parallel import Placed
from gptlab.runtime import Runtime

SAMPLES_PER_SHARD = 16  # blocks read from each shard for the fingerprint
SAMPLE_BYTES = 4096


# ----------------------------------------------------------------------------- data

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


def same_path(a: str | Path, b: str | Path) -> bool:
    """Whether two spellings (relative, absolute, through links) name the same directory."""
    return os.path.realpath(a) == os.path.realpath(b)


# ----------------------------------------------------------------------------- non-finite steps

def nonfinite_step(step: int, loss: float, norm: float | None, skipped: int, budget: int,
                   good: Path | None) -> tuple[int, str]:
    """A step whose loss or gradient norm is NaN/inf (its update was not applied). Returns the new
    count of skipped steps and a line to show, or raises once more than `budget` were skipped:
    the message names the last checkpoint whose weights gave a finite loss."""
    what = f"loss is {loss}" if not math.isfinite(loss) else f"gradient norm is {norm} (loss {loss:.4f})"
    skipped += 1
    if skipped > budget:
        where = f"; the last good checkpoint is {good}" if good else "; no checkpoint was saved yet"
        allowed = f" after skipping {budget} (--skip-nonfinite {budget})" if budget else ""
        raise UserError(f"{what} at step {step}: training stopped{allowed} "
                        f"(try a lower --lr, --dtype fp32, or --skip-nonfinite N){where}")
    return skipped, f"step {step}: {what}; update skipped ({skipped} of --skip-nonfinite {budget})"


@torch.no_grad()
def next_batch_loss(placed: Placed, rt: Runtime, loader: TrainLoader) -> float:
    """The loss the current weights give on the first micro-batch of the next step (mean over
    ranks), without moving the loader: eval mode, no gradients, no random numbers drawn.
    Collective under DDP/FSDP: every rank must call it."""
    x, y = loader.peek_batch()  # a stream is not re-planned: no shard fetched again
    model = placed.model  # the parameters' owner; under FSDP its forward gathers the shards
    was_training = model.training
    model.eval()
    try:
        with rt.autocast():
            _, loss = model(x.to(rt.device), y.to(rt.device), return_logits=False)
    finally:
        model.train(was_training)
    loss = loss.detach().float().reshape(1)
    if not torch.isfinite(loss).all():
        loss.fill_(float("inf"))  # so that the mean over ranks is not finite either
    dist.all_reduce_mean(loss)
    return float(loss.item())
