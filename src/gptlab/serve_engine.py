"""Dynamic batching for `gptlab serve`: one worker thread decodes every live sequence together.

Each sequence (one choice of one request) owns a row ("slot") of a preallocated KV cache and its
own length. A step feeds the newest token of every live row through the model as one batch
(B, 1), each row at its own position, attending only to its own cached keys. Requests that
arrive meanwhile are prefilled between two steps and join the batch at the next one; finished or
cancelled rows leave it there. The event loop never runs the model: it submits groups and
receives events through a callback that the worker calls (thread-safe on the caller's side).

At temperature 0 a sequence's tokens are those of `generate` (the same prefill, the same greedy
choice); batching only changes float rounding in the batched matmuls.
"""

from __future__ import annotations

import codecs
import logging
import os
import random
import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

from gptlab.errors import UserError
from gptlab.tokenizer import EOT

log = logging.getLogger("gptlab.serve")


@dataclass
class SamplingParams:
    """One request's sampling settings (already validated)."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_k: int = 0  # 0: no top-k cut
    top_p: float = 1.0
    stop: tuple[str, ...] = ()  # stop strings: the text ends before the first one
    seed: int | None = None
    stop_token: int | None = None  # a chat reply's end-of-turn token: the reply ends there too


# An event for one sequence: ("text", delta) as text becomes final, ("end", finish_reason) once,
# or ("error", message) if the worker failed while running it.
Event = tuple[str, str]


class TextState:
    """Token bytes -> text that is safe to send: whole UTF-8 characters, and nothing that could
    still turn out to be the start of a stop string."""

    def __init__(self, stop: tuple[str, ...]):
        self.utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.stop = stop
        self.text = ""  # all decoded text so far
        self.sent = 0  # characters of self.text already handed out

    def feed(self, data: bytes, final: bool = False) -> tuple[str, bool]:
        """Add bytes; return (new safe text, whether a stop string was found)."""
        self.text += self.utf8.decode(data, final=final)
        if self.stop:
            # a stop string may straddle what was sent: search from just before it
            start = max(0, self.sent - max(len(s) for s in self.stop) + 1)
            hits = [i for i in (self.text.find(s, start) for s in self.stop) if i >= 0]
            if hits:
                self.text = self.text[: min(hits)]
                return self._take(len(self.text)), True
        end = len(self.text)
        if not final:
            end -= self._held_back()
        return self._take(end), False

    def _held_back(self) -> int:
        """Length of the longest tail of the text that begins some stop string."""
        best = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(self.text)), best, -1):
                if self.text.endswith(s[:k]):
                    best = k
                    break
        return best

    def _take(self, end: int) -> str:
        end = max(end, self.sent)
        out = self.text[self.sent:end]
        self.sent = end
        return out


@dataclass
class Sequence:
    """One choice: its prompt and settings, where its events go, and its progress."""

    prompt: list[int]
    params: SamplingParams
    sink: Callable[[Event], None]  # called from the worker thread
    rng: random.Random | None = None  # a sampled sequence's draws (seeded: reproducible), on the host
    tokens: list[int] = field(default_factory=list)  # generated ids (an ending EOT included)
    cancelled: bool = False  # set from any thread; honoured at the next step boundary
    finish_reason: str | None = None
    text: TextState | None = None

    def __post_init__(self) -> None:
        self.text = TextState(self.params.stop)


class BatchCache:
    """Keys and values of `slots` rows, (L, slots, H, max_len, hd) each, with a length per row.

    Satisfies model.Cache in two modes. prefill(row): one row alone from position 0 (the model
    takes its usual causal path, as in `generate`). decode(n): rows 0..n-1 each write one new
    key/value at its own length; `positions` gives each row its position and `attn_mask` hides
    other rows' longer pasts (None when all rows are equally long, as for a lone request).
    """

    def __init__(self, model: torch.nn.Module, slots: int):
        cfg = model.config
        p = next(model.parameters())
        shape = (cfg.n_layer, slots, cfg.n_head, cfg.seq_len, cfg.head_dim)
        check_cache_fits(2 * torch.Size(shape).numel() * p.element_size(), p.device, slots)
        # CPU pages are only touched (committed) as rows fill up
        self.k = torch.empty(shape, device=p.device, dtype=p.dtype)
        self.v = torch.empty(shape, device=p.device, dtype=p.dtype)
        self.device = p.device
        self.lengths = [0] * slots  # cached positions of each row
        # positions below clean[r] hold finite numbers in row r; masked keys must not be NaN
        # garbage, since attention weighs them by 0 and 0 * NaN is NaN
        self.clean = [0] * slots
        self.pos = 0
        self.positions: torch.Tensor | None = None
        self.attn_mask: torch.Tensor | None = None
        self._row: int | None = None  # prefill mode: the row being filled
        self._n = 0  # decode mode: rows in the batch
        self._at: torch.Tensor | None = None  # decode mode: (n,) write position of each row

    @property
    def slots(self) -> int:
        return self.k.size(1)

    def prefill(self, row: int) -> None:
        self._row, self.pos, self.positions, self.attn_mask = row, 0, None, None

    def decode(self, n: int) -> None:
        lengths = self.lengths[:n]
        self._row, self._n, self.pos = None, n, max(lengths)
        self._at = torch.tensor(lengths, dtype=torch.long, device=self.device)  # (n,)
        self.positions = self._at.unsqueeze(1)  # (n, 1)
        end = self.pos + 1
        lo = min(self.clean[:n])
        if lo < end:  # one masked fill of the positions lo..end-1 that some row has not written yet
            clean = torch.tensor(self.clean[:n], dtype=torch.long, device=self.device)
            dirty = torch.arange(lo, end, device=self.device).unsqueeze(0) >= clean.unsqueeze(1)  # (n, span)
            dirty = dirty[None, :, None, :, None]  # over (L, n, H, span, hd)
            self.k[:, :n, :, lo:end].masked_fill_(dirty, 0)
            self.v[:, :n, :, lo:end].masked_fill_(dirty, 0)
            self.clean[:n] = [max(c, end) for c in self.clean[:n]]
        if min(lengths) == self.pos:
            self.attn_mask = None
        else:  # row r sees keys 0..lengths[r] (its past and its new token): (n, 1, 1, span)
            span = torch.arange(self.pos + 1, device=self.device)
            self.attn_mask = (span.unsqueeze(0) <= self._at.unsqueeze(1))[:, None, None, :]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self._row is not None:  # k, v: (1, H, T, hd) of one row from position 0
            r, T = self._row, k.size(2)
            self.k[layer, r:r + 1, :, :T] = k
            self.v[layer, r:r + 1, :, :T] = v
            self.clean[r] = max(self.clean[r], T)
            return self.k[layer, r:r + 1, :, :T], self.v[layer, r:r + 1, :, :T]
        n, end = self._n, self.pos + 1  # k, v: (n, H, 1, hd), row r at position lengths[r]
        rows = torch.arange(n, device=self.device)
        self.k[layer][rows, :, self._at] = k[:, :, 0]
        self.v[layer][rows, :, self._at] = v[:, :, 0]
        return self.k[layer, :n, :, :end], self.v[layer, :n, :, :end]  # (n, H, end, hd)

    def copy_row(self, src: int, dst: int) -> None:
        n = self.lengths[src]
        self.k[:, dst, :, :n] = self.k[:, src, :, :n]
        self.v[:, dst, :, :n] = self.v[:, src, :, :n]
        self.lengths[dst] = n
        self.clean[dst] = max(self.clean[dst], n)


class Engine:
    """Owns the model and a worker thread that runs every submitted sequence to its end."""

    def __init__(self, model: torch.nn.Module, tokenizer, max_batch: int = 32):
        self.model = model.eval()
        self.tok = tokenizer
        self.device = next(model.parameters()).device
        self.cache = BatchCache(model, max_batch)
        self.max_batch = max_batch
        self.active: list[Sequence] = []  # active[r] holds cache row r
        self.pending: deque[list[Sequence]] = deque()  # groups that share a prompt, in arrival order
        self._admitting: list[Sequence] = []  # a group between the queue and the batch
        self.cv = threading.Condition()
        self.running = True
        self.steps = 0  # decode steps run (for tests and stats)
        self.max_seen_batch = 0
        self.thread = threading.Thread(target=self._loop, name="gptlab-serve-engine", daemon=True)
        self.thread.start()

    # ------------------------------------------------------------------ called from any thread
    def submit(self, group: list[Sequence]) -> None:
        """Queue sequences that share one prompt (the choices of one prompt); 1 <= len <= max_batch."""
        if not 1 <= len(group) <= self.max_batch:
            raise ValueError(f"a group holds 1 to {self.max_batch} sequences, got {len(group)}")
        with self.cv:
            self.pending.append(group)
            self.cv.notify()

    def close(self) -> None:
        with self.cv:
            self.running = False
            self.cv.notify()
        self.thread.join(timeout=30)

    # ------------------------------------------------------------------ the worker thread
    def _loop(self) -> None:
        torch.set_grad_enabled(False)
        while True:
            with self.cv:
                while self.running and not self.pending and not self.active:
                    self.cv.wait()
                if not self.running:
                    break
            try:
                with torch.inference_mode():
                    self._admit()
                    if self.active:
                        self._step()
            except Exception:  # a fault of this batch: fail its requests, keep serving
                log.exception("generation failed; the requests in the batch get an error")
                self._fail_all()
        self._fail_all("the server is shutting down")

    def _admit(self) -> None:
        """Prefill waiting groups, first come first served, while their rows fit."""
        self._drop_cancelled()
        while True:
            with self.cv:
                while self.pending and all(s.cancelled for s in self.pending[0]):
                    self.pending.popleft()  # gone before it started: nothing to run or tell
                if not self.pending or len(self.active) + len(self.pending[0]) > self.max_batch:
                    return
                group = [s for s in self.pending.popleft() if not s.cancelled]
            self._admitting = group
            row = len(self.active)
            self.cache.prefill(row)
            idx = torch.tensor([group[0].prompt], dtype=torch.long, device=self.device)  # (1, T0)
            logits = self.model.logits(self.model.hidden(idx, self.cache)[:, -1, :])  # (1, V)
            self.cache.lengths[row] = len(group[0].prompt)
            for s in group:
                if s.params.temperature > 0:
                    s.rng = random.Random(s.params.seed)  # None: from OS entropy
            self.active.append(group[0])
            for j, s in enumerate(group[1:], start=1):  # every choice starts from the same prefill
                self.cache.copy_row(row, row + j)
                self.active.append(s)
            self._admitting = []
            self._emit_tokens(list(range(row, row + len(group))), logits.expand(len(group), -1))

    def _step(self) -> None:
        """One token for every active row."""
        n = len(self.active)
        self.max_seen_batch = max(self.max_seen_batch, n)
        self.cache.decode(n)
        last = torch.tensor([[s.tokens[-1]] for s in self.active], dtype=torch.long, device=self.device)
        logits = self.model.logits(self.model.hidden(last, self.cache)[:, -1, :])  # (n, V)
        for r in range(n):
            self.cache.lengths[r] += 1
        self.steps += 1
        self._emit_tokens(list(range(n)), logits)

    def _emit_tokens(self, rows: list[int], logits: torch.Tensor) -> None:
        """Sample the next token of each row (logits (len(rows), V)), send its text, retire the
        rows that ended."""
        seqs = [self.active[r] for r in rows]
        chosen = sample_rows(logits, [s.params for s in seqs], [s.rng for s in seqs]).tolist()  # one sync
        ended = []
        for r, s, t in zip(rows, seqs, chosen):
            s.tokens.append(t)
            if self._advance(s, t):
                ended.append(r)
        self._retire(ended)

    def _advance(self, s: Sequence, t: int) -> bool:
        """Feed one new token to a sequence's text; True if the sequence has ended."""
        reason = None
        if t == getattr(self.tok, "eot", EOT) or t == s.params.stop_token:
            delta, _ = s.text.feed(b"", final=True)
            reason = "stop"
        else:
            # a chat model's other special tokens (past the tokenizer's ids) have no text
            delta, hit = s.text.feed(self.tok.decode_bytes([t]) if t < self.tok.vocab_size else b"")
            if hit:
                reason = "stop"
            elif len(s.tokens) >= s.params.max_tokens:
                more, hit = s.text.feed(b"", final=True)
                delta += more
                reason = "stop" if hit else "length"
        self._send(s, ("text", delta))
        if reason is not None:
            s.finish_reason = reason
            self._send(s, ("end", reason))
        return reason is not None

    def _retire(self, rows: list[int]) -> None:
        """Remove rows from the batch, moving the last rows into the gaps (highest first)."""
        for r in sorted(rows, reverse=True):
            last = len(self.active) - 1
            if r != last:
                self.cache.copy_row(last, r)
                self.active[r] = self.active[last]
            self.active.pop()

    def _drop_cancelled(self) -> None:
        gone = [r for r, s in enumerate(self.active) if s.cancelled]
        for r in gone:
            self._send(self.active[r], ("end", "cancelled"))
        self._retire(gone)

    def _fail_all(self, message: str = "internal server error") -> None:
        failed = list(self.active) + list(getattr(self, "_admitting", []))
        with self.cv:
            while self.pending and not self.running:
                failed.extend(self.pending.popleft())
        for s in failed:
            self._send(s, ("error", message))
        self.active, self._admitting = [], []

    @staticmethod
    def _send(s: Sequence, event: Event) -> None:
        try:
            s.sink(event)
        except Exception:  # the receiver is gone (its loop closed): nothing to tell it
            log.debug("dropped an event for a gone request", exc_info=True)


def sample_rows(logits: torch.Tensor, params: list[SamplingParams], rngs: list) -> torch.Tensor:
    """The next token of every row at once: logits (n, V) -> ids (n,), with no per-row kernel or
    sync. Greedy rows (temperature 0) take the argmax. The others are cut as generate.sample_next
    cuts them (temperature, then the top_k largest, then the top_p nucleus of those renormalised)
    and draw by inverse CDF with one uniform from their own host rng (seeded: reproducible)."""
    logits = logits.float()
    best = logits.argmax(dim=-1)
    sampled = [p.temperature > 0 for p in params]
    if not any(sampled):
        return best
    n, V = logits.shape
    dev = logits.device
    temps = torch.tensor([p.temperature if p.temperature > 0 else 1.0 for p in params], device=dev)
    x = logits / temps.unsqueeze(1)
    ks = [p.top_k if 0 < p.top_k < V else V for p in params]
    cut = any(k < V for k, on in zip(ks, sampled) if on) or any(p.top_p < 1.0 for p in params)
    if cut:  # candidates sorted largest first: all of them, or the largest top_k a sampled row asks for
        kmax = max(k for k, on in zip(ks, sampled) if on)
        vals, idx = torch.topk(x, kmax, dim=-1) if kmax < V else torch.sort(x, dim=-1, descending=True)
        rank = torch.arange(vals.size(1), device=dev).unsqueeze(0)
        vals = vals.masked_fill(rank >= torch.tensor(ks, device=dev).unsqueeze(1), float("-inf"))
        probs = F.softmax(vals, dim=-1)
        top_p = torch.tensor([p.top_p for p in params], device=dev).unsqueeze(1)
        # drop a candidate once the ones ranked above it already hold top_p (the first is always kept)
        probs = probs.masked_fill((probs.cumsum(dim=-1) - probs >= top_p) & (rank > 0), 0.0)
    else:
        probs, idx = F.softmax(x, dim=-1), None
    cdf = probs.cumsum(dim=-1)
    u = torch.tensor([[r.random() if on else 0.0] for r, on in zip(rngs, sampled)], dtype=cdf.dtype, device=dev)
    j = torch.searchsorted(cdf, u * cdf[:, -1:], right=True).clamp(max=cdf.size(1) - 1)  # (n, 1)
    ids = (j if idx is None else idx.gather(-1, j)).squeeze(-1)
    return torch.where(torch.tensor(sampled, device=dev), ids, best)


def available_bytes(device: torch.device) -> int | None:
    """Memory a new allocation can take: on CUDA the free bytes plus the caching allocator's unused
    blocks; on a CPU the available RAM (None where the system does not say)."""
    if device.type == "cuda":
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return torch.cuda.mem_get_info(device)[0] + max(0, cached)
    if device.type != "cpu":
        return None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def check_cache_fits(nbytes: int, device: torch.device, slots: int) -> None:
    """Refuse, in one line, a KV cache larger than the memory the device has available."""
    free = available_bytes(torch.device(device))
    if free is not None and nbytes > free:
        gib = 1 << 30
        raise UserError(f"the KV cache of {slots} rows needs {nbytes / gib:.2f} GiB but the {device.type} has "
                        f"{free / gib:.2f} GiB available: lower --max-batch")
