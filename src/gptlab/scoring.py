"""Log-likelihoods of continuations after contexts: the engine of HellaSwag and of the
lm-evaluation-harness model (harness.py).

Two ways to score:
- score_rows: whole rows (context + continuation each), right-padded, one forward pass. Works for
  any module with GPT's call signature.
- score_shared: a gptlab GPT runs each context once with all of its continuations packed after
  it in one row (PackedRows: per-token positions and an attention mask that keeps continuations
  apart); rows of any lengths, sorted and right-padded, share one forward pass.

With causal attention a pad token only follows the real tokens, so it cannot change their
outputs, and pad positions are never scored. Only scored positions go through the output layer.

The end of the module holds what every evaluation shares (HellaSwag, validation loss): the mode
switch, the rank and world size, the progress bar.
"""

from __future__ import annotations

import contextlib
import functools
import sys
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from gptlab import dist
from gptlab.model import GPT

PAD_ID = 0
"""The id that right-pads rows: never scored and seen by no real token, so any id of every
vocabulary (GPT-2's or a trained one's) does."""


def _head_logprobs(model: GPT, h: torch.Tensor, tgt: torch.Tensor, greedy: bool = False,
                   n_chunks: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log p(tgt[k]) from hidden states h (K, C) -> (K,) float32; with `greedy` also whether
    tgt[k] is the most likely token -> (K,) bool.

    Only these K positions go through the output layer (vocab x C): that layer is most of a small
    model's cost, and context positions need no logits. Chunks of 2048 rows bound the (K, V) logits."""
    lps, hits = [], []
    # n_chunks: exactly this many output-layer calls (some may be empty), for a sharded model where
    # every call is a collective that all ranks must make alike
    pieces = zip(h.tensor_split(n_chunks), tgt.tensor_split(n_chunks)) if n_chunks else zip(h.split(2048), tgt.split(2048))
    for hk, tk in pieces:
        logits = model.logits(hk).float()  # (k, V)
        lps.append(logits.gather(1, tk[:, None]).squeeze(1) - logits.logsumexp(-1))
        if greedy:
            hits.append(logits.argmax(-1) == tk)
    return torch.cat(lps), (torch.cat(hits) if greedy else None)


def _token_logprobs(model, idx: torch.Tensor, rows: torch.Tensor, pos: torch.Tensor,
                    tgt: torch.Tensor, n_chunks: int | None = None) -> torch.Tensor:
    """log p(tgt[k] | idx[rows[k], :pos[k] + 1]) for each scored position k -> (K,) float32.
    A gptlab GPT runs its body once and the output layer on scored positions only; any other
    module with the GPT call signature gets a full forward."""
    if isinstance(model, GPT):
        return _head_logprobs(model, model.hidden(idx)[rows, pos], tgt, n_chunks=n_chunks)[0]
    logits, _ = model(idx)  # (B, T, V)
    logits = logits[rows, pos].float()  # (K, V)
    return logits.gather(1, tgt[:, None]).squeeze(1) - logits.logsumexp(-1)


def score_rows(model: torch.nn.Module, rows: Sequence[tuple[Sequence[int], int]],
               device, n_chunks: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-likelihood of each row's continuation and its token count, in one forward pass
    over whole rows (context + continuation each).

    rows: (ids, n_cont) with ids = context + continuation, already cropped to the model's context + 1.
    Returns (R,) sums (float64; float32 on MPS) and (R,) int64 counts, on the CPU."""
    lengths = [len(r) - 1 for r, _ in rows]  # inputs are row[:-1]
    idx = torch.full((len(rows), max(lengths)), PAD_ID, dtype=torch.long)  # (R, T), right-padded
    r_idx, c_idx, p_idx, tgt = [], [], [], []
    for i, (ids, n_cont) in enumerate(rows):
        L = len(ids) - 1
        idx[i, :L] = torch.tensor(ids[:-1], dtype=torch.long)
        # the continuation's tokens are ids[L+1-n_cont : L+1], predicted at positions L-n_cont .. L-1
        r_idx.extend([i] * n_cont)
        c_idx.extend(range(n_cont))
        p_idx.extend(range(L - n_cont, L))
        tgt.extend(ids[L + 1 - n_cont:])
    dev = torch.device(device)
    as_t = functools.partial(torch.tensor, dtype=torch.long, device=dev)
    lp = _token_logprobs(model, idx.to(dev), as_t(r_idx), as_t(p_idx), as_t(tgt), n_chunks)  # (K,)
    counts = torch.tensor([n for _, n in rows], dtype=torch.long)
    return _row_sums(lp, as_t(r_idx), as_t(c_idx), len(rows), int(counts.max())).cpu(), counts


def _row_sums(values: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, R: int, width: int) -> torch.Tensor:
    """Sum values[k] into row rows[k] through a zero-padded (R, width) table: a fixed-order sum,
    where index_add_ would accumulate with atomics on a GPU and could differ from run to run.
    Summed in sum_dtype."""
    acc = sum_dtype(values.device)
    table = torch.zeros(R, width, dtype=acc, device=values.device)
    table[rows, cols] = values.to(acc)
    return table.sum(1)


def sum_dtype(device: torch.device) -> torch.dtype:
    """float64 for summed log-likelihoods (a float32 sum of ~100 is only good to ~1e-5), except
    on MPS, which has no float64."""
    return torch.float32 if torch.device(device).type == "mps" else torch.float64


# ----------------------------------------------------------------------------- shared contexts

PACK_TOKENS = 1024
"""A packed row holds one context and as many of its continuations as fit in this many tokens
(at least one): attention over a packed row costs its length squared."""


class PackedRows:
    """A model.Cache that stores nothing: it hands GPT.hidden per-token `positions` (B, T) and an
    `attn_mask` (B, 1, T, T), so that one forward pass runs packed rows.

    A packed row is a context followed by several continuations (each without its last token,
    which is never an input). A continuation's tokens take the positions that follow the context,
    as if each were alone after it, and see the context and their own earlier tokens only, never
    another continuation's: every token computes exactly what it would in the whole row context +
    continuation, while the context runs once. Pad tokens (after the row's end) see only the
    row's first token, so no attention row is empty, and are never scored."""

    def __init__(self, positions: torch.Tensor, segments: torch.Tensor) -> None:
        # segments: 0 context, k >= 1 the k-th continuation of the row, -1 padding
        self.pos = 0
        self.positions = positions
        q_pos, k_pos = positions[:, :, None], positions[:, None, :]
        q_seg, k_seg = segments[:, :, None], segments[:, None, :]
        visible = (k_pos <= q_pos) & ((k_seg == 0) | ((k_seg == q_seg) & (k_seg > 0)))
        self.attn_mask = visible[:, None]  # (B, 1, T, T), the same for every head

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return k, v


@dataclass(frozen=True)
class ContextGroup:
    """Continuations (each non-empty) to score after one context (non-empty); len(context) +
    len(continuation) - 1 must fit the model's context."""

    context: tuple[int, ...]
    continuations: tuple[tuple[int, ...], ...]

    @property
    def packed_len(self) -> int:
        """Tokens of the context and all continuations packed in one row."""
        return len(self.context) + sum(len(c) - 1 for c in self.continuations)


def plan_shared_batches(groups: Sequence[ContextGroup], max_rows: int) -> list[list[int]]:
    """Indices of groups cut into batches for score_shared: groups sorted by their packed length
    (so that the rows' right-padding stays small), at most max_rows continuations a batch (a
    larger group is a batch alone). Depends on nothing but `groups`."""
    batches: list[list[int]] = []
    cur: list[int] = []
    rows = 0
    for g in sorted(range(len(groups)), key=lambda g: (groups[g].packed_len, g)):
        n = len(groups[g].continuations)
        if cur and rows + n > max_rows:
            batches.append(cur)
            cur, rows = [], 0
        cur.append(g)
        rows += n
    if cur:
        batches.append(cur)
    return batches


def _pack(groups: Sequence[ContextGroup]) -> list[tuple[tuple[int, ...], list[tuple[int, ...]]]]:
    """Groups as packed rows (context, continuations): a group whose packing exceeds PACK_TOKENS
    is cut into several rows that each repeat its context. Continuations stay in order."""
    rows = []
    for g in groups:
        cur: list[tuple[int, ...]] = []
        n = len(g.context)
        for c in g.continuations:
            if cur and n + len(c) - 1 > PACK_TOKENS:
                rows.append((g.context, cur))
                cur, n = [], len(g.context)
            cur.append(c)
            n += len(c) - 1
        rows.append((g.context, cur))
    return rows


def score_shared(model: GPT, groups: Sequence[ContextGroup], device,
                 greedy: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Summed log-likelihood of every continuation of `groups`, each context run once: a group
    is one packed row (PackedRows), the rows right-padded into one forward pass, and only the
    scored positions go through the output layer.

    Returns (R,) sums (float64; float32 on MPS), in the order of the groups' continuations, and with `greedy`
    (R,) bools (every continuation token was the most likely one), on the CPU."""
    dev = torch.device(device)
    rows = _pack(groups)
    T = max(len(ctx) + sum(len(c) - 1 for c in cs) for ctx, cs in rows)
    idx = torch.full((len(rows), T), PAD_ID, dtype=torch.long)
    positions = torch.zeros(len(rows), T, dtype=torch.long)
    segments = torch.full((len(rows), T), -1, dtype=torch.long)
    at_b: list[int] = []  # scored token k is predicted by the hidden state at (at_b[k], at_t[k])
    at_t: list[int] = []
    tgt: list[int] = []
    sum_r: list[int] = []  # ... and is token sum_c[k] of continuation sum_r[k]
    sum_c: list[int] = []
    r = 0
    for b, (ctx, conts) in enumerate(rows):
        Lc = len(ctx)
        idx[b, :Lc] = torch.tensor(ctx, dtype=torch.long)
        positions[b, :Lc] = torch.arange(Lc)
        segments[b, :Lc] = 0
        off = Lc
        for s, c in enumerate(conts, 1):
            n = len(c) - 1
            if n:
                idx[b, off:off + n] = torch.tensor(c[:-1], dtype=torch.long)
                positions[b, off:off + n] = torch.arange(Lc, Lc + n)
                segments[b, off:off + n] = s
            # token 0 is predicted by the context's last state, token j >= 1 by token j - 1
            at_b.extend([b] * len(c))
            at_t.append(Lc - 1)
            at_t.extend(range(off, off + n))
            tgt.extend(c)
            sum_r.extend([r] * len(c))
            sum_c.extend(range(len(c)))
            off += n
            r += 1
    as_t = functools.partial(torch.tensor, dtype=torch.long, device=dev)
    layout = PackedRows(positions.to(dev), segments.to(dev))
    h = model.hidden(idx.to(dev), layout)[as_t(at_b), as_t(at_t)]  # (K, C)
    lp, hit = _head_logprobs(model, h, as_t(tgt), greedy)
    rows_t, cols_t = as_t(sum_r), as_t(sum_c)
    width = max(sum_c) + 1
    sums = _row_sums(lp, rows_t, cols_t, r, width).cpu()
    if not greedy:
        return sums, None
    misses = _row_sums((~hit).float(), rows_t, cols_t, r, width)
    return sums, (misses == 0).cpu()


# ----------------------------------------------------------------------------- shared by evaluations

@contextlib.contextmanager
def eval_mode(module: torch.nn.Module):
    """eval() for the duration, then every submodule back to the mode it had."""
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for m, mode in modes:
            m.training = mode


def rank_world() -> tuple[int, int]:
    """This process's rank and the world size of the process group (0, 1 without one). Read from
    the group itself, so a group started outside dist.init() is sharded correctly too."""
    if dist.is_initialized():
        import torch.distributed as tdist

        return tdist.get_rank(), tdist.get_world_size()
    return 0, 1


def context_len(model: torch.nn.Module) -> int | None:
    """The model's context length (config.seq_len), None for a module without one."""
    cfg = getattr(model, "config", None)
    return getattr(cfg, "seq_len", None)


def progress(total: float, desc: str, unit: str, enabled: bool, **kw):
    """A tqdm bar on stderr (the same look for every evaluation); disabled unless `enabled`."""
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, dynamic_ncols=True, disable=not enabled, **kw)


def autocast_or_null(autocast: Callable[[], Any] | None) -> Callable[[], Any]:
    """The autocast factory, or one that does nothing."""
    return autocast if autocast is not None else contextlib.nullcontext
