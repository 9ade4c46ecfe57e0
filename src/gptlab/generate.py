"""KV cache, next-token sampling, and a generator that yields tokens step by step.

A prompt is run once (the prefill, for one row, copied to every sample), then each step feeds only
the newest token of each sample through the preallocated cache. Samples that emit the stop token
leave the batch, so the remaining ones run on a smaller batch.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F

from gptlab.config import EOT_TOKEN
from gptlab.errors import UserError


# candidates examined before falling back to a full sort for nucleus (top-p only) sampling
_NUCLEUS_CANDIDATES = 1024


class PromptWarning(UserWarning):
    """The prompt or the requested length does not fit the model's context."""


class KVCache:
    """Keys and values of every layer in two preallocated tensors (L, B, H, max_len, hd).

    Satisfies model.Cache: attention writes its new k, v at positions pos..pos+T and reads back
    views of everything so far, so no step allocates or concatenates cache memory.
    Only the first `k.size(0)` batch rows are used; `keep` selects and reorders rows.
    """

    def __init__(self, n_layer: int, batch_size: int, n_head: int, head_dim: int, max_len: int,
                 device: torch.device | str | None = None, dtype: torch.dtype = torch.float32):
        shape = (n_layer, batch_size, n_head, max_len, head_dim)
        self.k = torch.empty(shape, device=device, dtype=dtype)
        self.v = torch.empty(shape, device=device, dtype=dtype)
        self.max_len = max_len
        self.pos = 0
        self.positions: torch.Tensor | None = None  # every row at pos, pos+1, ... (model.Cache)
        self.attn_mask: torch.Tensor | None = None  # causal (model.Cache)

    @classmethod
    def for_model(cls, model: torch.nn.Module, batch_size: int, max_len: int | None = None,
                  dtype: torch.dtype | None = None) -> "KVCache":
        """dtype: the dtype attention computes in, when it is not the parameters' (FSDP casting
        fp32 parameters to bf16, say); keys and values are stored in it."""
        cfg = model.config
        p = next(model.parameters())
        return cls(cfg.n_layer, batch_size, cfg.n_head, cfg.head_dim, max_len or cfg.seq_len, p.device,
                   dtype or p.dtype)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        B, _, T, _ = k.shape  # (B, H, T, hd)
        end = self.pos + T
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions, asked to store up to {end}")
        if B > self.k.size(1):
            raise ValueError(f"KV cache holds {self.k.size(1)} rows, got a batch of {B}")
        self.k[layer, :B, :, self.pos:end] = k
        self.v[layer, :B, :, self.pos:end] = v
        return self.k[layer, :B, :, :end], self.v[layer, :B, :, :end]  # (B, H, end, hd) views

    def keep(self, rows: torch.Tensor) -> None:
        """Make rows[i] the new row i (for i < len(rows)): drops finished samples, or copies one
        prefilled row to every sample. Indexing with a tensor copies first, so overlap is safe."""
        n = rows.numel()
        if n > self.k.size(1):
            raise ValueError(f"KV cache holds {self.k.size(1)} rows, asked for {n}")
        self.k[:, :n, :, : self.pos] = self.k[:, rows, :, : self.pos]
        self.v[:, :n, :, : self.pos] = self.v[:, rows, :, : self.pos]

    def reset(self) -> None:
        self.pos = 0


def check_sampling(temperature: float, top_k: int | None, top_p: float) -> None:
    if not temperature >= 0:  # also catches NaN
        raise UserError(f"temperature must be >= 0 (0 means greedy), got {temperature}")
    if top_k is not None and top_k < 0:
        raise UserError(f"top-k must be >= 0 (0 means no top-k cut), got {top_k}")
    if not 0 < top_p <= 1:
        raise UserError(f"top-p must be in (0, 1] (1 means no nucleus cut), got {top_p}")


def sample_next(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = 50,
                top_p: float = 1.0, generator: torch.Generator | None = None) -> torch.Tensor:
    """Next token of each row: logits (B, V) -> ids (B,).

    temperature 0 is greedy (argmax); otherwise the logits are divided by temperature, cut to the
    top_k largest (0 or None: no cut), then to the smallest set holding top_p of the probability
    (1: no cut), and one id is drawn per row with `generator`.
    """
    logits = logits.float()
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    V = logits.size(-1)
    if top_k and top_k < V:
        # work on the k candidates only: (B, k), sorted largest first; top_p then applies to
        # their renormalised probabilities (as transformers orders the two cuts)
        vals, idx = torch.topk(logits, top_k, dim=-1)
        probs = F.softmax(vals, dim=-1)
    elif top_p < 1.0:
        full = F.softmax(logits, dim=-1)  # (B, V)
        # the nucleus is almost always within the top few hundred ids: a partial top-k is exact
        # whenever its candidates already hold top_p in every row, and far cheaper than a full sort
        vals, idx = torch.topk(logits, min(V, _NUCLEUS_CANDIDATES), dim=-1)
        probs = full.gather(-1, idx)
        if bool((probs.sum(dim=-1) < top_p).any()):
            vals, idx = torch.sort(logits, dim=-1, descending=True)  # (B, V)
            probs = full.gather(-1, idx)
    else:
        probs = F.softmax(logits, dim=-1)
        return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
    if top_p < 1.0:
        # drop a candidate once the ones ranked above it already hold top_p (the first is always kept)
        above = probs.cumsum(dim=-1) - probs
        vals = vals.masked_fill(above >= top_p, float("-inf"))
    choice = torch.multinomial(F.softmax(vals, dim=-1), 1, generator=generator)  # (B, 1)
    return idx.gather(-1, choice).squeeze(-1)


def make_generator(device: torch.device | str, seed: int | None) -> torch.Generator:
    """A torch.Generator on device: seeded for reproducible samples, else from OS entropy."""
    g = torch.Generator(device=device)
    if seed is None:
        g.seed()
    else:
        g.manual_seed(seed)
    return g


def fit_prompt(prompt: Sequence[int], seq_len: int, max_new_tokens: int) -> tuple[list[int], int]:
    """Crop a prompt (keeping its end) so that max_new_tokens still fit in the context, and say
    how many new tokens fit.

    The last new token is never fed back, so prompt + new tokens may reach seq_len + 1: a prompt
    keeps at most seq_len - max_new_tokens + 1 tokens, and at least one."""
    prompt = [int(t) for t in prompt]
    if not prompt:
        raise UserError("the prompt is empty; give at least one token (e.g. <|endoftext|>)")
    keep = max(1, seq_len - max_new_tokens + 1)
    if len(prompt) > keep:
        over = f", more than the context of {seq_len}" if len(prompt) > seq_len else ""
        warnings.warn(
            f"the prompt has {len(prompt)} tokens{over}; keeping its last {keep} so that "
            f"{min(max_new_tokens, seq_len)} new tokens fit in the context of {seq_len}",
            PromptWarning, stacklevel=3,
        )
        prompt = prompt[-keep:]
    room = seq_len - len(prompt) + 1
    if max_new_tokens > room:
        warnings.warn(
            f"only {room} new token{'s' if room != 1 else ''} fit in the context of {seq_len} after a {len(prompt)}-token prompt; "
            f"stopping there instead of at {max_new_tokens}",
            PromptWarning, stacklevel=3,
        )
    return prompt, min(max_new_tokens, room)


@torch.inference_mode()  # on a generator function torch enters/leaves the mode around every step
def generate(model: torch.nn.Module, prompt: Sequence[int], *, num_samples: int = 1,
             max_new_tokens: int = 100, temperature: float = 1.0, top_k: int | None = 50,
             top_p: float = 1.0, generator: torch.Generator | None = None, seed: int | None = None,
             stop_token: int | None = EOT_TOKEN, cache_dtype: torch.dtype | None = None,
             ) -> Iterator[list[int | None]]:
    """Sample num_samples continuations of one prompt (token ids), together as one batch.

    Yields once per step a list of num_samples entries: the new token of each sample, or None for
    a sample that already ended. A sample ends with the step that yields stop_token (None: never),
    every sample at max_new_tokens or at the context length. Reproducible with `seed` (or a
    `generator` on the model's device). cache_dtype: see KVCache.for_model.
    """
    if num_samples < 1:
        raise UserError(f"num-samples must be at least 1, got {num_samples}")
    if max_new_tokens < 1:
        raise UserError(f"max-new-tokens must be at least 1, got {max_new_tokens}")
    check_sampling(temperature, top_k, top_p)
    cfg = model.config
    if prompt and max(prompt) >= cfg.vocab_size:  # e.g. GPT-2's end-of-text on a --vocab-size model
        raise UserError(f"the prompt holds id {max(prompt)}, outside the model's vocabulary of {cfg.vocab_size}: "
                        f"the model was trained on ids below {cfg.vocab_size} and cannot read this text")
    prompt, n_new = fit_prompt(prompt, cfg.seq_len, max_new_tokens)
    device = next(model.parameters()).device
    if generator is None:
        generator = make_generator(device, seed)
    B = num_samples
    # the last new token is never fed back: prompt + n_new - 1 positions are cached
    cache = KVCache.for_model(model, B, max_len=len(prompt) + n_new - 1, dtype=cache_dtype)
    was_training = model.training
    model.eval()
    try:
        # prefill one copy of the prompt, then share its keys/values with every sample
        idx = torch.tensor([prompt], dtype=torch.long, device=device)  # (1, T0)
        # only the last position needs the output layer
        logits = model.logits(model.hidden(idx, cache)[:, -1, :]).expand(B, -1)  # (B, V)
        if B > 1:
            cache.keep(torch.zeros(B, dtype=torch.long, device=device))
        rows = list(range(B))  # rows[r]: which sample cache row r holds
        for step in range(n_new):
            nxt = sample_next(logits, temperature, top_k, top_p, generator)  # (b,)
            tokens = nxt.tolist()
            out: list[int | None] = [None] * B
            for r, t in zip(rows, tokens):
                out[r] = t
            yield out
            if step == n_new - 1:
                break
            if stop_token is not None and stop_token in tokens:
                alive = [i for i, t in enumerate(tokens) if t != stop_token]
                if not alive:
                    break
                keep = torch.tensor(alive, dtype=torch.long, device=device)
                cache.keep(keep)
                nxt = nxt[keep]
                rows = [rows[i] for i in alive]
            logits = model.logits(model.hidden(nxt.unsqueeze(1), cache)[:, -1, :])  # (b, V)
    finally:
        model.train(was_training)


def generate_ids(model: torch.nn.Module, prompt: Sequence[int], **kwargs) -> list[list[int]]:
    """Run `generate` to the end: the new tokens of each sample (ending with stop_token if it stopped)."""
    n = kwargs.get("num_samples", 1)
    out: list[list[int]] = [[] for _ in range(n)]
    for step in generate(model, prompt, **kwargs):
        for i, t in enumerate(step):
            if t is not None:
                out[i].append(t)
    return out


# ----------------------------------------------------------------------------- text in, text out

@dataclass
class Sample:
    prompt: str
    text: str
    """The new text, without the end-of-text token."""
    tokens: list[int]
    """The new token ids (ending with end-of-text if the sample stopped there)."""


def sample_text(model: torch.nn.Module, tok, prompts: Sequence[str], *, num_samples: int = 1,
                max_new_tokens: int = 100, temperature: float = 1.0, top_k: int | None = 50, top_p: float = 1.0,
                generator: torch.Generator | None = None,
                on_token: Callable[[int, int, int], None] | None = None,
                on_sample: Callable[[int, int, Sample], None] | None = None) -> list[Sample]:
    """Samples of each text prompt (num_samples of one prompt drawn together as one batch), in
    prompt-then-sample order. An empty prompt starts a fresh document (<|endoftext|>).

    on_token(prompt_i, sample_i, token) sees every new token as it is drawn (for streaming);
    on_sample(prompt_i, sample_i, sample) sees each sample as soon as it is complete."""
    results: list[Sample] = []
    for pi, prompt in enumerate(prompts):
        eot = getattr(tok, "eot", EOT_TOKEN)  # the model's own tokenizer's end-of-text
        ids = tok.encode(prompt, allow_special=True) or [eot]
        new: list[list[int]] = [[] for _ in range(num_samples)]
        done: list[Sample | None] = [None] * num_samples

        def finish(i: int) -> None:
            done[i] = Sample(prompt, tok.decode([t for t in new[i] if t != eot]), new[i])
            if on_sample is not None:
                on_sample(pi, i, done[i])

        for step in generate(model, ids, num_samples=num_samples, max_new_tokens=max_new_tokens,
                             temperature=temperature, top_k=top_k, top_p=top_p, generator=generator,
                             stop_token=eot):
            for i, t in enumerate(step):
                if t is None:
                    continue
                new[i].append(t)
                if on_token is not None:
                    on_token(pi, i, t)
                if t == eot:
                    finish(i)
        for i in range(num_samples):
            if done[i] is None:
                finish(i)
        results.extend(done)
    return results
