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

A chat split (shards with loss masks, `gptlab prepare chat`) is cut into rows instead: row i is
conversation i alone, padded to T (_ChatRows), its targets the assistant tokens only; the rows are
visited in the same keyed order, so everything below holds for them too.

Streamed data (`data` an http(s) URL or hf://, see gptlab.data.stream) cannot be shuffled across
all shards with bounded disk, so it has its own order, shard by shard (_ShardOrder): epoch e
visits the train shards in a seeded permutation of the shards, and inside each shard its windows
in a seeded permutation of that shard's windows (both keyed by seed, e and the shard). The
positions are the same global positions as above, so steps, ranks and micro-steps split them in
the same way and the order is deterministic, the same for any world size and resumable from the
step alone. A rank needs one shard at a time (two at a shard boundary inside a batch, read in
turn), which is what bounds the disk.
"""

from __future__ import annotations

import hashlib
import queue
import threading
import time
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from gptlab.data import shards as sh
from gptlab.data import stream as st
from gptlab.data.remote import is_remote
from gptlab.errors import UserError

STATE_KIND = "gptlab.TrainLoader"
STATE_VERSION = 1
STREAM_ORDER = "shards-v1"
IGNORE = -100  # a target that is not trained on (the models' ignore_index)  # the streamed data order's name in the loader state
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

    def __init__(self, shards: list[sh.Shard], seq_len: int, model_vocab: int | None = None) -> None:
        self.shards = shards
        self.T = seq_len
        self.model_vocab = model_vocab  # ids are checked against it too (a --vocab-size model)
        counts = np.array([max(0, (s.tokens - 1) // seq_len) for s in shards], dtype=np.int64)
        self.start = np.concatenate([[0], np.cumsum(counts)])  # (S+1,) first window id of each shard
        self.count = int(self.start[-1])
        self._maps: dict[int, np.ndarray] = {}

    def fingerprint(self) -> str:
        return _fingerprint(self.shards)

    def _tokens(self, s: int) -> np.ndarray:
        m = self._maps.get(s)
        if m is None:
            # a plain ndarray view: slicing an np.memmap object costs several times more
            m = self._maps[s] = sh.open_checked(self.shards[s], model_vocab=self.model_vocab).view(np.ndarray)
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


class _ChatRows:
    """The conversations of a chat split (shards with loss masks): row i is conversation i alone,
    cut to T+1 tokens and padded after its end, so that no conversation attends to another's
    tokens. Targets are the next tokens where the mask is 1 (assistant text and its end token),
    else IGNORE; padding is end-of-text in x and IGNORE in y."""

    def __init__(self, shards: list[sh.Shard], seq_len: int) -> None:
        self.shards = shards
        self.T = seq_len
        manifest = sh.read_manifest(shards[0].path.parent)
        self.eot = int(manifest["tokenizer"]["eot"])
        self.vocab_size = max(manifest["chat"]["special_tokens"].values()) + 1
        rows_shard, rows_start, rows_end = [], [], []
        self._maps: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        for k in range(len(shards)):
            tokens, _ = self._arrays(k)
            starts = np.flatnonzero(tokens == self.eot)  # every conversation opens with end-of-text
            rows_shard.append(np.full(len(starts), k, dtype=np.int64))
            rows_start.append(starts)
            rows_end.append(np.append(starts[1:], len(tokens)))
        self.row_shard = np.concatenate(rows_shard)
        self.row_start = np.concatenate(rows_start).astype(np.int64)
        self.row_end = np.concatenate(rows_end).astype(np.int64)
        self.count = len(self.row_start)
        lengths = self.row_end - self.row_start
        self.truncated = int(np.count_nonzero(lengths > seq_len + 1))
        # the cost of one conversation a row: the share of input positions that are padding
        used = np.minimum(lengths, seq_len + 1) - 1
        self.padding = 1.0 - float(used.sum()) / max(1, self.count * seq_len)

    def fingerprint(self) -> str:
        return _fingerprint(self.shards)

    def _arrays(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        m = self._maps.get(k)
        if m is None:
            s = self.shards[k]
            m = self._maps[k] = (sh.open_checked(s, self.vocab_size).view(np.ndarray),
                                 sh.open_checked_mask(s).view(np.ndarray))
        return m

    def gather(self, ids: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """x, y (len(ids), T) int64 for row ids."""
        T = self.T
        x = np.full((len(ids), T), self.eot, dtype=np.int64)  # (B, T)
        y = np.full((len(ids), T), IGNORE, dtype=np.int64)
        for r, i in enumerate(np.asarray(ids).tolist()):
            tokens, mask = self._arrays(int(self.row_shard[i]))
            a = int(self.row_start[i])
            b = min(int(self.row_end[i]), a + T + 1)
            t, m = tokens[a:b].astype(np.int64), mask[a:b]
            x[r, : b - a - 1] = t[:-1]
            y[r, : b - a - 1] = np.where(m[1:] == 1, t[1:], IGNORE)
        return torch.from_numpy(x), torch.from_numpy(y)


def open_windows(shards: list[sh.Shard], seq_len: int, model_vocab: int | None = None) -> "_Windows | _ChatRows":
    """A split's training examples: windows of a token stream, or the rows of a chat split.
    model_vocab: a --vocab-size model's vocabulary, below which a token stream's ids must be."""
    if shards and shards[0].mask is not None:
        return _ChatRows(shards, seq_len)
    return _Windows(shards, seq_len, model_vocab)


def _fingerprint(shards: list[sh.Shard] | list[sh.Entry]) -> str:
    h = hashlib.sha256()
    for s in shards:
        name = s.path.name if isinstance(s, sh.Shard) else s.file
        h.update(f"{name}:{s.tokens};".encode())
    return h.hexdigest()[:16]


def _key(*parts: int) -> int:
    k = 0x5EED
    for p in parts:
        k = _splitmix64(k ^ (p & _M64))
    return k


class _ShardOrder:
    """The streamed data order (see the module docstring). A "use" is one shard's turn in one
    epoch: use u = e * S + k is slot k of epoch e's shard permutation; it covers the global
    positions [e*W + cum_e[k], e*W + cum_e[k+1])."""

    def __init__(self, tokens: list[int], seq_len: int, seed: int) -> None:
        self.T = seq_len
        self.counts = np.array([max(0, (n - 1) // seq_len) for n in tokens], dtype=np.int64)  # (S,) windows
        self.S, self.W, self.seed = len(tokens), int(self.counts.sum()), seed
        self._epochs: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def layout(self, e: int) -> tuple[np.ndarray, np.ndarray]:
        """(order (S,) shard of each slot, cum (S+1,) first epoch position of each slot)."""
        got = self._epochs.get(e)
        if got is None:
            if len(self._epochs) > 4:
                self._epochs.clear()
            order = Permutation(self.S, _key(self.seed, 1, e))(np.arange(self.S))
            cum = np.concatenate([[0], np.cumsum(self.counts[order])])
            got = self._epochs[e] = (order, cum)
        return got

    def locate(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(use, shard, token offset) of each global position, all (n,)."""
        epochs, local = np.divmod(np.asarray(positions, dtype=np.int64), self.W)
        use, shard, offset = (np.empty_like(local) for _ in range(3))
        for e in np.unique(epochs).tolist():
            sel = epochs == e
            order, cum = self.layout(e)
            slot = np.searchsorted(cum, local[sel], side="right") - 1
            use[sel] = e * self.S + slot
            shard[sel] = order[slot]
            j = local[sel] - cum[slot]  # index inside the shard's turn
            for s in np.unique(shard[sel]).tolist():
                m = shard[sel] == s
                w = Permutation(int(self.counts[s]), _key(self.seed, 2, e, s))(j[m])
                offset[np.flatnonzero(sel)[m]] = w * self.T
        return use, shard, offset

    def plan(self, first: int, owned: tuple[int, int, int]) -> Iterator[tuple[int, int]]:
        """(use, shard) of every turn holding a position >= first that a rank owns, in order, for
        ever. owned = (G, o, P): the rank owns positions p with (p - o) mod G < P."""
        G, o, P = owned
        e = first // self.W
        while True:
            order, cum = self.layout(e)
            for k in range(self.S):
                a, b = max(e * self.W + int(cum[k]), first), e * self.W + int(cum[k + 1])
                if a >= b:
                    continue
                step, rem = divmod(a - o, G)
                p = a if rem < P else (step + 1) * G + o  # the rank's first position at or after a
                if p < b:
                    yield e * self.S + k, int(order[k])
            e += 1


def _split_shards(data_dir: str | Path, split: str) -> list[sh.Shard]:
    if is_remote(data_dir) and split == "val":
        shards = st.val_split(data_dir)
        if not shards:
            raise UserError(f"{data_dir}: no val split")
        return shards
    ds = sh.open_dataset(data_dir)
    shards = ds.split(split)
    if not shards:
        have = ", ".join(sorted(ds.splits)) or "none"
        raise UserError(f"{data_dir}: no {split} split (splits present: {have})")
    return shards


@dataclass(frozen=True)
class ValSplit:
    """A val split on local disk, handed to evaluations explicitly: its shards, and the source they
    come from (for messages). From open_val(data) or a train loader's val_split()."""

    where: str
    shards: tuple[sh.Shard, ...]


def open_val(data) -> ValSplit:
    """The val split of a dataset directory or a remote source (fetched on its own); a ValSplit as it is."""
    if isinstance(data, ValSplit):
        return data
    return ValSplit(str(data), tuple(_split_shards(data, "val")))


def _check_positive(**values: int) -> None:
    for name, v in values.items():
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise UserError(f"{name} must be a positive integer, got {v!r}")


class TrainLoader:
    """Batches of the train split for one rank; see the module docstring for the order."""

    def __init__(self, data_dir, *, seq_len: int, batch_size: int, grad_accum: int = 1,
                 rank: int = 0, world_size: int = 1, seed: int = 1337, split: str = "train",
                 cache: str | Path | None = None, disk_budget: int | str | None = None,
                 ahead: int = st.DEFAULT_AHEAD, retry: st.Retry | None = None,
                 model_vocab: int | None = None) -> None:
        """data_dir: a dataset directory, an http(s) URL or hf://datasets/OWNER/NAME[/DIR]. For
        the last two, shards are streamed through `cache` within `disk_budget` (see gptlab.data.stream).
        model_vocab: the model's vocabulary where it is smaller than the data's (ids are checked)."""
        self.model_vocab = model_vocab
        _check_positive(seq_len=seq_len, batch_size=batch_size, grad_accum=grad_accum, world_size=world_size)
        if not isinstance(rank, int) or not 0 <= rank < world_size:
            raise UserError(f"rank must be in [0, {world_size}), got {rank!r}")
        self.data_dir = str(data_dir)
        self.split = split
        self.seq_len, self.batch_size, self.grad_accum = seq_len, batch_size, grad_accum
        self.rank, self.world_size, self.seed = rank, world_size, int(seed)
        self.global_batch = batch_size * grad_accum * world_size  # windows per optimizer step
        self._stream: st.ShardStream | None = None
        if is_remote(data_dir):
            self._open_stream(cache, disk_budget, ahead, retry)
        else:
            self._windows = open_windows(_split_shards(data_dir, split), seq_len, model_vocab)
            self.windows_per_epoch = self._windows.count
            self._fp = self._windows.fingerprint()
        self.tokens_per_epoch = self.windows_per_epoch * seq_len
        if self.windows_per_epoch < self.global_batch:
            raise UserError(
                f"{data_dir}: the {split} split has {self.windows_per_epoch} windows of {seq_len + 1} tokens, "
                f"fewer than one global batch of {self.global_batch} (batch_size {batch_size} x grad_accum "
                f"{grad_accum} x world_size {world_size}); use a smaller batch or seq_len, or more data")
        self.step = 0  # optimizer steps fully consumed
        self._micro = 0  # micro-steps of the current step already served
        self._perms: dict[int, Permutation] = {}
        self._cache: tuple[int, np.ndarray] = (0, np.zeros((0, 0), dtype=np.int64))
        self._peeked: tuple[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] | None = None
        self._pin: bool | None = None  # None: no background thread; else whether it pins the batches
        self._worker: _Prefetch | None = None
        self.batch_wait_seconds = 0.0
        """Seconds next_batch and peek_batch spent waiting for the background thread's next batch."""

    def _open_stream(self, cache, disk_budget, ahead: int, retry: st.Retry | None) -> None:
        if self.split != "train":
            raise UserError(f"{self.data_dir}: only the train split is streamed")
        stream = st.open_stream(self.data_dir, cache=cache, budget=disk_budget, rank=self.rank,
                                world_size=self.world_size, ahead=ahead, retry=retry)
        self._stream = stream
        self._finalizer = weakref.finalize(self, stream.close)  # stop fetching, delete the train shards
        self._order = _ShardOrder([e.tokens for e in stream.train], self.seq_len, self.seed)
        self.windows_per_epoch = self._order.W
        self._fp = _fingerprint(stream.train)
        self._current: tuple[int, np.ndarray] | None = None  # (use, tokens) of the shard being read
        self._planned_from: tuple[int, int] | None = None

    def val_split(self) -> ValSplit:
        """The val split of this loader's data: a streaming loader's own copy (in its cache, within
        its disk budget, fetched on the first call), else the directory's."""
        if self._stream is None:
            return open_val(self.data_dir)
        shards = self._stream.val_split()
        if not shards:
            raise UserError(f"{self.data_dir}: no val split")
        return ValSplit(self.data_dir, tuple(shards))

    def prefetch(self, pin_memory: bool = False) -> None:
        """Prepare the batches in a background thread, one optimizer step (grad_accum micro-batches)
        ahead; pin_memory (for a CUDA device: then `.to(device, non_blocking=True)` is asynchronous)
        pins them. The state stays that of the batches handed out: a checkpoint never counts the
        prefetched ones, and load_state_dict restarts the thread at the loaded position."""
        self.stop_prefetch()
        self._pin = bool(pin_memory)

    def stop_prefetch(self) -> None:
        """Stop the background thread and drop what it prepared (prefetch() starts it again)."""
        if self._worker is not None:
            self._worker.stop()
            self._worker = None

    def close(self) -> None:
        """Stop a streaming loader's fetching and delete its train shards (local loaders: nothing)."""
        self.stop_prefetch()
        if self._stream is not None:
            self._current = None
            self._finalizer()

    @property
    def streaming(self) -> bool:
        return self._stream is not None

    @property
    def wait_seconds(self) -> float:
        """Seconds next_batch spent waiting for streamed shards (0 for a local directory)."""
        return self._stream.wait_seconds if self._stream is not None else 0.0

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

    def _positions(self, step: int, micro: int) -> np.ndarray:
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
        step, micro = self.step, self._micro
        self._micro += 1
        if self._micro == self.grad_accum:
            self._micro = 0
            self.step += 1
        peeked, self._peeked = self._peeked, None
        if peeked is not None and peeked[0] == (step, micro):
            return peeked[1]
        return self._prepared(step, micro)

    def peek_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch next_batch will return, without moving the loader. A stream is neither
        re-planned nor re-fetched: the batch is kept and next_batch hands it out, so a shard the
        peek moved on to is not needed twice (the stream deletes a shard once a later one is read)."""
        at = (self.step, self._micro)
        if self._peeked is None or self._peeked[0] != at:
            self._peeked = (at, self._prepared(*at))
        return self._peeked[1]

    def _prepared(self, step: int, micro: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch at (step, micro): from the background thread when prefetching, else cut now."""
        if self._pin is None:
            return self._batch(step, micro)
        if self._worker is None:
            self._worker = _Prefetch(self, (step, micro), self.grad_accum, self._pin)
        t0 = time.perf_counter()
        at, got = self._worker.take()
        self.batch_wait_seconds += time.perf_counter() - t0
        if isinstance(got, BaseException):
            self.stop_prefetch()
            raise got
        if at != (step, micro):  # the thread prepares positions in order from where it started
            raise RuntimeError(f"prefetched batch {at}, wanted {(step, micro)} (a gptlab bug)")
        return got

    def _batch(self, step: int, micro: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self._stream is not None:
            return self._stream_batch(step, micro)
        return self._windows.gather(self._ids_for(step, micro))

    def _stream_batch(self, step: int, micro: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self._planned_from != (step, micro):
            # (re)start the fetching from this position: at the first batch, or after load_state_dict
            self._current = None
            per_rank = self.batch_size * self.grad_accum
            owned = (self.global_batch, self.rank * per_rank, per_rank)
            self._stream.start(self._order.plan(int(self._positions(step, micro)[0]), owned))
        nxt = (step + 1, 0) if micro + 1 == self.grad_accum else (step, micro + 1)
        use, shard, offset = self._order.locate(self._positions(step, micro))
        T = self.seq_len
        buf = np.empty((len(use), T + 1), dtype=np.int64)  # (B, T+1)
        for u in np.unique(use).tolist():  # in increasing order: the order the stream fetches
            if self._current is None or self._current[0] != u:
                self._current = None  # unmap the previous shard before the stream deletes it
                s = int(shard[use == u][0])
                path = self._stream.get(u)
                toks = sh.open_tokens(path, self._stream.train[s].tokens)  # verified when it was fetched
                sh.check_vocab(toks, str(path), sh.manifest_vocab_size(self._stream.ds.manifest), self.model_vocab)
                self._current = (u, toks.view(np.ndarray))
            toks = self._current[1]
            for r in np.flatnonzero(use == u).tolist():
                buf[r] = toks[offset[r]: offset[r] + T + 1]
        self._planned_from = nxt
        t = torch.from_numpy(buf)
        return t[:, :-1].contiguous(), t[:, 1:].contiguous()

    def state_dict(self) -> dict[str, Any]:
        return {
            "kind": STATE_KIND, "version": STATE_VERSION, "split": self.split, "seq_len": self.seq_len,
            "seed": self.seed, "global_batch": self.global_batch, "step": self.step, "micro_step": self._micro,
            "epoch": self.epoch, "windows_per_epoch": self.windows_per_epoch,
            "windows_consumed": self.step * self.global_batch, "dataset": self._fp,
            "layout": self._layout(),  # [batch_size, grad_accum, world_size], checked only mid-step
        } | ({"order": STREAM_ORDER} if self._stream is not None else {})

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not isinstance(state, dict) or state.get("kind") != STATE_KIND or state.get("version") != STATE_VERSION:
            raise UserError("data loader state: not a TrainLoader state of this version")
        checks = (("split", self.split), ("seq_len", self.seq_len), ("seed", self.seed),
                  ("windows_per_epoch", self.windows_per_epoch), ("dataset", self._fp),
                  ("order", STREAM_ORDER if self._stream is not None else None))
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
        self.stop_prefetch()  # (prefetch() settings stay: the thread restarts at the loaded position)
        self.step, self._micro = step, micro
        self._peeked = None

    def _layout(self) -> list[int]:
        return [self.batch_size, self.grad_accum, self.world_size]


class _Prefetch:
    """A thread that cuts a loader's batches in order from position `at` = (step, micro) into a
    queue of `depth` (one optimizer step), pinned with `pin`. An error is queued in the batch's place."""

    def __init__(self, loader: TrainLoader, at: tuple[int, int], depth: int, pin: bool) -> None:
        self.loader, self.pin = loader, pin
        self.queue: queue.Queue = queue.Queue(maxsize=max(1, depth))
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(at,), name="gptlab-batch-prefetch", daemon=True)
        self.thread.start()

    def _run(self, at: tuple[int, int]) -> None:
        step, micro = at
        ld = self.loader
        while not self._stop.is_set():
            try:
                x, y = ld._batch(step, micro)
                item: Any = (x.pin_memory(), y.pin_memory()) if self.pin else (x, y)
            except BaseException as e:  # handed to the consumer, which raises it
                item = e
            while not self._stop.is_set():
                try:
                    self.queue.put(((step, micro), item), timeout=0.1)
                    break
                except queue.Full:
                    pass
            if isinstance(item, BaseException):
                return
            step, micro = (step + 1, 0) if micro + 1 == ld.grad_accum else (step, micro + 1)

    def take(self) -> tuple[tuple[int, int], Any]:
        while True:
            try:
                return self.queue.get(timeout=1.0)
            except queue.Empty:
                if not self.thread.is_alive():
                    raise RuntimeError("the batch prefetch thread ended (a gptlab bug)") from None

    def stop(self) -> None:
        self._stop.set()
        self.thread.join(timeout=60)


def iter_val_batches(data, *, seq_len: int, batch_size: int, max_tokens: int | None = None,
                     rank: int = 0, world_size: int = 1,
                     model_vocab: int | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """x, y (b, T) int64 batches of the val split's first windows in order (b = batch_size, the
    last batch of a rank may be smaller). max_tokens limits the windows to max_tokens // T. The
    windows are cut into world_size contiguous parts, so their union is the same for any world
    size; ranks may get one batch more or fewer, so sum losses and counts, then reduce once.
    data: a dataset directory, a remote source or a ValSplit (see open_val)."""
    _check_positive(seq_len=seq_len, batch_size=batch_size, world_size=world_size)
    if not isinstance(rank, int) or not 0 <= rank < world_size:
        raise UserError(f"rank must be in [0, {world_size}), got {rank!r}")
    val = open_val(data)
    windows = open_windows(list(val.shards), seq_len, model_vocab)
    n = windows.count
    if n == 0:
        total = sum(s.tokens for s in windows.shards)
        raise UserError(f"{val.where}: the val split has {total} tokens, fewer than one window of {seq_len + 1}")
    if max_tokens is not None:
        n = min(n, max(1, max_tokens // seq_len))
    lo, hi = rank * n // world_size, (rank + 1) * n // world_size
    for a in range(lo, hi, batch_size):
        yield windows.gather(np.arange(a, min(a + batch_size, hi), dtype=np.int64))


def val_windows(data, *, seq_len: int, max_tokens: int | None = None) -> int:
    """How many windows iter_val_batches yields over all ranks together."""
    windows = open_windows(list(open_val(data).shards), seq_len)
    n = windows.count
    return n if max_tokens is None else min(n, max(1, max_tokens // seq_len))


def dataset_summary(data_dir) -> dict[str, Any]:
    """Shards per split, tokens, documents and source of a dataset directory."""
    return sh.dataset_summary(data_dir)
