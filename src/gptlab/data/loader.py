"""Shards -> (B, T) batches: shuffled, rank-aware, resumable, world-size independent.

A split is cut into windows of T+1 tokens that start every T tokens inside each shard (inputs
are the first T, targets the last T; a window never crosses a shard). The windows of an epoch
are visited in a pseudo-random order: a keyed bijection of [0, windows) (a Feistel network with
cycle walking), so any position of any epoch is computed directly, in O(1) memory, with no
permutation array to hold, and a new epoch gets a new order. Shuffling across and within shards
removes the periodic loss of build-nanogpt's strictly sequential order.

Global window positions count on across epochs: step s uses positions [s*G, (s+1)*G) with
G = batch_size * grad_accum * world_size, so the windows of a step depend only on the seed, s
and G. Inside a step, rank r takes the contiguous part [r*B*A, (r+1)*B*A) and its micro-step m
the B positions from m*B on: 2 ranks x 1 micro-step see exactly what 1 rank x 2 micro-steps see.
The loader state is therefore the step (and micro-step) count alone, and loads on any layout
with the same G.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from gptlab.data import shards as sh
from gptlab.errors import UserError

STATE_KIND = "gptlab.TrainLoader"
STATE_VERSION = 1
_M64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    """A 64-bit mixing function (SplitMix64's finaliser), on Python ints."""
    x = (x + 0x9E3779B97F4A7C15) & _M64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _M64
    return x ^ (x >> 31)


class Permutation:
    """A keyed pseudo-random bijection of [0, n), evaluated on arrays of indices.

    A balanced Feistel network on 2*h bits (the smallest even width covering n; at most 4n values)
    permutes [0, 2^(2h)); cycle walking (apply again while the value is >= n) restricts it to a
    bijection of [0, n). Integer arithmetic only, so equal on every platform."""

    ROUNDS = 6
    _C1 = np.uint64(0xBF58476D1CE4E5B9)
    _C2 = np.uint64(0x94D049BB133111EB)

    def __init__(self, n: int, key: int) -> None:
        if n < 1:
            raise ValueError("a permutation of an empty range")
        self.n = n
        bits = max(2, (n - 1).bit_length())
        bits += bits % 2
        self.half = np.uint64(bits // 2)
        self.mask = np.uint64((1 << (bits // 2)) - 1)
        self.keys = [np.uint64(_splitmix64(key ^ (r * 0x632BE59BD9B4E019) & _M64)) for r in range(self.ROUNDS)]

    def _round(self, right: np.ndarray, key: np.uint64) -> np.ndarray:
        h = (right ^ key) * self._C1  # uint64 arithmetic wraps, as intended
        h ^= h >> np.uint64(29)
        h *= self._C2
        h ^= h >> np.uint64(32)
        return h & self.mask

    def _feistel(self, x: np.ndarray) -> np.ndarray:
        left, right = x >> self.half, x & self.mask
        for k in self.keys:
            left, right = right, left ^ self._round(right, k)
        return (left << self.half) | right

    def __call__(self, idx: np.ndarray) -> np.ndarray:
        x = self._feistel(np.asarray(idx, dtype=np.uint64))
        n = np.uint64(self.n)
        out_of_range = x >= n
        while out_of_range.any():
            x[out_of_range] = self._feistel(x[out_of_range])
            out_of_range = x >= n
        return x.astype(np.int64)


class _Windows:
    """The windows of one split: window i of shard s starts at token i*T and spans T+1 tokens."""

    def __init__(self, shards: list[sh.Shard], seq_len: int) -> None:
        self.shards = shards
        self.T = seq_len
        counts = np.array([max(0, (s.tokens - 1) // seq_len) for s in shards], dtype=np.int64)
        self.start = np.concatenate([[0], np.cumsum(counts)])  # (S+1,) first window id of each shard
        self.count = int(self.start[-1])
        self._maps: dict[int, np.ndarray] = {}

    def fingerprint(self) -> str:
        h = hashlib.sha256()
        for s in self.shards:
            h.update(f"{s.path.name}:{s.tokens};".encode())
        return h.hexdigest()[:16]

    def _tokens(self, s: int) -> np.ndarray:
        m = self._maps.get(s)
        if m is None:
            # a plain ndarray view: slicing an np.memmap object costs several times more
            m = self._maps[s] = sh.open_tokens(self.shards[s].path, self.shards[s].tokens).view(np.ndarray)
        return m

    def gather(self, ids: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """x, y (len(ids), T) int64 for window ids."""
        T = self.T
        shard = np.searchsorted(self.start, ids, side="right") - 1
        offset = (ids - self.start[shard]) * T
        buf = np.empty((len(ids), T + 1), dtype=np.int64)  # (B, T+1)
        for r, (s, o) in enumerate(zip(shard.tolist(), offset.tolist())):
            buf[r] = self._tokens(s)[o: o + T + 1]
        t = torch.from_numpy(buf)
        return t[:, :-1].contiguous(), t[:, 1:].contiguous()


def _split_shards(data_dir: str | Path, split: str) -> list[sh.Shard]:
    ds = sh.open_dataset(data_dir)
    shards = ds.split(split)
    if not shards:
        have = ", ".join(sorted(ds.splits)) or "none"
        raise UserError(f"{data_dir}: no {split} split (splits present: {have})")
    return shards


def _check_positive(**values: int) -> None:
    for name, v in values.items():
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise UserError(f"{name} must be a positive integer, got {v!r}")


class TrainLoader:
    """Batches of the train split for one rank; see the module docstring for the order."""

    def __init__(self, data_dir, *, seq_len: int, batch_size: int, grad_accum: int = 1,
                 rank: int = 0, world_size: int = 1, seed: int = 1337, split: str = "train") -> None:
        _check_positive(seq_len=seq_len, batch_size=batch_size, grad_accum=grad_accum, world_size=world_size)
        if not isinstance(rank, int) or not 0 <= rank < world_size:
            raise UserError(f"rank must be in [0, {world_size}), got {rank!r}")
        self.data_dir = str(data_dir)
        self.split = split
        self.seq_len, self.batch_size, self.grad_accum = seq_len, batch_size, grad_accum
        self.rank, self.world_size, self.seed = rank, world_size, int(seed)
        self._windows = _Windows(_split_shards(data_dir, split), seq_len)
        self.windows_per_epoch = self._windows.count
        self.tokens_per_epoch = self.windows_per_epoch * seq_len
        self.global_batch = batch_size * grad_accum * world_size  # windows per optimizer step
        if self.windows_per_epoch < self.global_batch:
            raise UserError(
                f"{data_dir}: the {split} split has {self.windows_per_epoch} windows of {seq_len + 1} tokens, "
                f"fewer than one global batch of {self.global_batch} (batch_size {batch_size} x grad_accum "
                f"{grad_accum} x world_size {world_size}); use a smaller batch or seq_len, or more data")
        self.step = 0  # optimizer steps fully consumed
        self._micro = 0  # micro-steps of the current step already served
        self._perms: dict[int, Permutation] = {}
        self._cache: tuple[int, np.ndarray] = (0, np.zeros((0, 0), dtype=np.int64))

    @property
    def epoch(self) -> int:
        """The epoch (0-based) of the current step's first window."""
        return self.step * self.global_batch // self.windows_per_epoch

    def _permutation(self, epoch: int) -> Permutation:
        p = self._perms.get(epoch)
        if p is None:
            if len(self._perms) > 4:  # only the epochs of the cached steps are in use
                self._perms.clear()
            key = _splitmix64(_splitmix64(self.seed & _M64) ^ epoch)
            p = self._perms[epoch] = Permutation(self.windows_per_epoch, key)
        return p

    def window_ids(self, positions: np.ndarray) -> np.ndarray:
        """Window ids at global positions (which count on across epochs)."""
        W = self.windows_per_epoch
        epochs, local = np.divmod(np.asarray(positions, dtype=np.int64), W)
        if epochs.size and epochs.min() == epochs.max():
            return self._permutation(int(epochs.flat[0]))(local)
        ids = np.empty_like(local)
        for e in np.unique(epochs).tolist():
            sel = epochs == e
            ids[sel] = self._permutation(e)(local[sel])
        return ids

    def positions(self, step: int, micro: int) -> np.ndarray:
        """The global positions of this rank's micro-batch `micro` of optimizer step `step`, (B,)."""
        base = step * self.global_batch + self.rank * self.batch_size * self.grad_accum + micro * self.batch_size
        return base + np.arange(self.batch_size, dtype=np.int64)

    def _ids_for(self, step: int, micro: int) -> np.ndarray:
        # The permutation is evaluated for this rank's windows of many steps at once (numpy call
        # overhead dominates at B=8): (K, A*B) ids cached for steps [first, first+K).
        first, cached = self._cache
        if not first <= step < first + len(cached):
            per_rank = self.batch_size * self.grad_accum
            k = max(1, 4096 // per_rank)
            starts = (step + np.arange(k, dtype=np.int64)) * self.global_batch + self.rank * per_rank
            cached = self.window_ids(starts[:, None] + np.arange(per_rank, dtype=np.int64)).reshape(k, per_rank)
            self._cache = first, cached = step, cached
        b = self.batch_size
        return cached[step - first, micro * b: (micro + 1) * b]

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """x, y (B, T) int64 on the CPU for this rank's next micro-step."""
        ids = self._ids_for(self.step, self._micro)
        self._micro += 1
        if self._micro == self.grad_accum:
            self._micro = 0
            self.step += 1
        return self._windows.gather(ids)

    def state_dict(self) -> dict[str, Any]:
        return {
            "kind": STATE_KIND, "version": STATE_VERSION, "split": self.split, "seq_len": self.seq_len,
            "seed": self.seed, "global_batch": self.global_batch, "step": self.step, "micro_step": self._micro,
            "epoch": self.epoch, "windows_per_epoch": self.windows_per_epoch,
            "windows_consumed": self.step * self.global_batch, "dataset": self._windows.fingerprint(),
            "layout": self._layout(),  # [batch_size, grad_accum, world_size], checked only mid-step
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not isinstance(state, dict) or state.get("kind") != STATE_KIND or state.get("version") != STATE_VERSION:
            raise UserError("data loader state: not a TrainLoader state of this version")
        checks = (("split", self.split), ("seq_len", self.seq_len), ("seed", self.seed),
                  ("windows_per_epoch", self.windows_per_epoch), ("dataset", self._windows.fingerprint()))
        for key, mine in checks:
            if state.get(key) != mine:
                what = "the dataset differs" if key in ("windows_per_epoch", "dataset") else f"{key} differs"
                raise UserError(f"data loader state: {what} (saved {state.get(key)!r}, now {mine!r}); "
                                f"resume with the data and settings of the saved run")
        if state.get("global_batch") != self.global_batch:
            raise UserError(f"data loader state: saved with {state.get('global_batch')} windows per step, now "
                            f"{self.global_batch} (batch_size x grad_accum x world_size must stay the same)")
        step, micro = state.get("step"), state.get("micro_step", 0)
        if micro and state.get("layout") != self._layout():
            raise UserError("data loader state: saved in the middle of a step; resume with the same batch layout")
        if not isinstance(step, int) or step < 0 or not isinstance(micro, int) or not 0 <= micro < self.grad_accum:
            raise UserError(f"data loader state: bad step {step!r} / micro_step {micro!r}")
        self.step, self._micro = step, micro

    def _layout(self) -> list[int]:
        return [self.batch_size, self.grad_accum, self.world_size]


def iter_val_batches(data_dir, *, seq_len: int, batch_size: int, max_tokens: int | None = None,
                     rank: int = 0, world_size: int = 1) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """x, y (b, T) int64 batches of the val split's first windows in order (b = batch_size, the
    last batch of a rank may be smaller). max_tokens limits the windows to max_tokens // T. The
    windows are cut into world_size contiguous parts, so their union is the same for any world
    size; ranks may get one batch more or fewer, so sum losses and counts, then reduce once."""
    _check_positive(seq_len=seq_len, batch_size=batch_size, world_size=world_size)
    if not isinstance(rank, int) or not 0 <= rank < world_size:
        raise UserError(f"rank must be in [0, {world_size}), got {rank!r}")
    windows = _Windows(_split_shards(data_dir, "val"), seq_len)
    n = windows.count
    if n == 0:
        total = sum(s.tokens for s in windows.shards)
        raise UserError(f"{data_dir}: the val split has {total} tokens, fewer than one window of {seq_len + 1}")
    if max_tokens is not None:
        n = min(n, max(1, max_tokens // seq_len))
    lo, hi = rank * n // world_size, (rank + 1) * n // world_size
    for a in range(lo, hi, batch_size):
        yield windows.gather(np.arange(a, min(a + batch_size, hi), dtype=np.int64))


def val_windows(data_dir, *, seq_len: int, max_tokens: int | None = None) -> int:
    """How many windows iter_val_batches yields over all ranks together."""
    windows = _Windows(_split_shards(data_dir, "val"), seq_len)
    n = windows.count
    return n if max_tokens is None else min(n, max(1, max_tokens // seq_len))


def dataset_summary(data_dir) -> dict[str, Any]:
    """Shards per split, tokens, documents and source of a dataset directory."""
    return sh.dataset_summary(data_dir)
