"""Log-likelihoods of continuations after contexts: the engine of HellaSwag and of the
lm-evaluation-harness model (harness.py).

Two ways to score:
- score_rows: whole rows (context + continuation each), right-padded, one forward pass. Works for
  any module with GPT's call signature.
- score_shared: a gptlab GPT runs each context once and all of its continuations from the
  context's keys and values (PrefixCache); contexts of one length form an unpadded block, and
  the continuations, right-padded, follow in a second pass.

With causal attention a pad token only follows the real tokens, so it cannot change their
outputs, and pad positions are never scored. Only scored positions go through the output layer.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Sequence

import torch

from gptlab.config import EOT_TOKEN
from gptlab.model import GPT


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
    Returns (R,) float32 sums and (R,) int64 counts, on the CPU."""
    lengths = [len(r) - 1 for r, _ in rows]  # inputs are row[:-1]
    idx = torch.full((len(rows), max(lengths)), EOT_TOKEN, dtype=torch.long)  # (R, T), right-padded
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
    where index_add_ would accumulate with atomics on a GPU and could differ from run to run."""
    table = torch.zeros(R, width, dtype=values.dtype, device=values.device)
    table[rows, cols] = values
    return table.sum(1)


# ----------------------------------------------------------------------------- shared contexts

class PrefixCache:
    """A model.Cache that runs a block of contexts once, then many continuations of each.

    First `GPT.hidden(contexts (n, Lc), cache)`: attention stores each layer's keys and values
    (n, H, Lc, hd) and, at position 0, is plain causal attention over the contexts. Then
    `fan_out(src)` maps continuation row r to context src[r], and the second `hidden(conts (R, Tc),
    cache)` gives row r the keys/values of context src[r] followed by its own, at positions Lc..:
    each row computes what the whole sequence context + continuation would, without running the
    context again."""

    def __init__(self) -> None:
        self.pos = 0
        self._k: dict[int, torch.Tensor] = {}
        self._v: dict[int, torch.Tensor] = {}
        self._src: torch.Tensor | None = None

    def fan_out(self, src: torch.Tensor) -> None:
        self._src = src

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self._src is None:  # the contexts
            self._k[layer], self._v[layer] = k, v
            return k, v
        # (R, H, Lc + Tc, hd): one layer at a time, so the fanned-out copy never exists for all layers
        return (torch.cat([self._k[layer][self._src], k], 2), torch.cat([self._v[layer][self._src], v], 2))


@dataclass(frozen=True)
class ContextGroup:
    """Continuations (each non-empty) to score after one context (non-empty); len(context) +
    len(continuation) - 1 must fit the model's context."""

    context: tuple[int, ...]
    continuations: tuple[tuple[int, ...], ...]


def plan_shared_batches(groups: Sequence[ContextGroup], max_rows: int) -> list[list[int]]:
    """Indices of groups cut into batches for score_shared: the contexts of a batch have one
    length (they run as one unpadded (n, Lc) block), a batch holds at most max_rows continuations
    (a larger group is a batch alone), and groups are sorted by context and then continuation
    length, so the continuations' right-padding stays small. Depends on nothing but `groups`."""
    def key(g: int) -> tuple[int, int, int]:
        return len(groups[g].context), max(len(c) for c in groups[g].continuations), g

    batches: list[list[int]] = []
    cur: list[int] = []
    rows = 0
    for g in sorted(range(len(groups)), key=key):
        n = len(groups[g].continuations)
        if cur and (len(groups[g].context) != len(groups[cur[0]].context) or rows + n > max_rows):
            batches.append(cur)
            cur, rows = [], 0
        cur.append(g)
        rows += n
    if cur:
        batches.append(cur)
    return batches


def score_shared(model: GPT, groups: Sequence[ContextGroup], device,
                 greedy: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Summed log-likelihood of every continuation of `groups` (contexts of one length), each
    context run once: the contexts in one pass, then all continuations from their keys/values.

    Returns (R,) float32 sums, in the order of the groups' continuations, and with `greedy`
    (R,) bools (every continuation token was the most likely one), on the CPU."""
    dev = torch.device(device)
    as_t = functools.partial(torch.tensor, dtype=torch.long, device=dev)
    conts = [(i, c) for i, g in enumerate(groups) for c in g.continuations]
    R, width = len(conts), max(len(c) for _, c in conts)
    cache = PrefixCache()
    h_last = model.hidden(as_t([g.context for g in groups]), cache)[:, -1]  # (n, C)
    src = as_t([i for i, _ in conts])
    # scored token j of row r: j = 0 is predicted by its context's last state, j >= 1 by the
    # continuation pass at position j - 1 (the continuation's last token is never an input)
    r_idx = [r for r, (_, c) in enumerate(conts) for _ in range(len(c) - 1)]
    c_idx = [j for _, c in conts for j in range(1, len(c))]
    tgt = [c[0] for _, c in conts] + [t for _, c in conts for t in c[1:]]
    h = h_last[src]  # (R, C)
    if width > 1:
        inp = torch.full((R, width - 1), EOT_TOKEN, dtype=torch.long)  # right-padded: pads only follow
        for r, (_, c) in enumerate(conts):                              # real tokens, never precede them
            inp[r, :len(c) - 1] = torch.tensor(c[:-1], dtype=torch.long)
        cache.fan_out(src)
        h_cont = model.hidden(inp.to(dev), cache)  # (R, width - 1, C)
        h = torch.cat([h, h_cont[as_t(r_idx), as_t(c_idx) - 1]])  # (K, C)
    lp, hit = _head_logprobs(model, h, as_t(tgt), greedy)
    rows = torch.cat([torch.arange(R, device=dev), as_t(r_idx)])
    cols = torch.cat([torch.zeros(R, dtype=torch.long, device=dev), as_t(c_idx)])
    sums = _row_sums(lp, rows, cols, R, width).cpu()
    if not greedy:
        return sums, None
    misses = _row_sums((~hit).float(), rows, cols, R, width)
    return sums, (misses == 0).cpu()
