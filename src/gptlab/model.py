"""The GPT-2 network, exactly as OpenAI built it, and its initialisation.

Nothing else lives here: no I/O, no optimizer, no printing. Parameter names match GPT-2's
checkpoint (transformer.wte, transformer.h.N.attn.c_attn, ...), so Hugging Face import and export
are a key map plus the Conv1D transposes (in hf.py).
"""

from __future__ import annotations

import math
from typing import Any, Callable, ClassVar, Protocol, runtime_checkable

import torch
import torch.nn as nn
import torch.nn.functional as F

from gptlab.config import ModelConfig


@runtime_checkable
class Cache(Protocol):
    """Everything the model reads from a cache, one protocol for the three kinds:
    generate.KVCache (one batch, all rows at the same length), serve_engine.BatchCache (rows at
    different lengths) and scoring.PackedRows (stores nothing; packed rows in one pass)."""

    pos: int
    """Cached positions so far; GPT.hidden advances it by T after each call."""
    positions: torch.Tensor | None
    """(B, T) per-token positions of a ragged or packed batch, or None: pos, pos+1, ... for every row.
    Whoever sets it keeps them within the context."""
    attn_mask: torch.Tensor | None
    """Which keys each query sees, broadcastable to (B, H, T, keys), or None: causal after pos."""

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (B, H, T, hd) at positions pos..pos+T and return all keys/values so far."""
        ...


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.n_head = cfg.n_head
        self.n_embd = cfg.n_embd
        self.dropout = cfg.dropout
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd)
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd)
        self.c_proj.residual_scale = True  # scaled init, see GPT._init_weights
        self.resid_dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, cache: Cache | None = None) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        # (B, T, C) -> (B, H, T, hd)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        past = 0
        # a cache of rows at different lengths (serve_engine.BatchCache) or of packed rows
        # (scoring.PackedRows) says which keys each query sees
        row_mask = cache.attn_mask if cache is not None else None
        if cache is not None:
            past = cache.pos
            k, v = cache.update(self.layer, k, v)  # (B, H, past+T, hd)
        dropout_p = self.dropout if self.training else 0.0
        if row_mask is not None:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=row_mask, dropout_p=dropout_p)
        elif past == 0:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout_p)
        elif T == 1:
            # one new token attends to every cached position
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p)
        else:
            # T new tokens after `past` cached ones: query i sees keys 0..past+i
            mask = torch.ones(T, past + T, dtype=torch.bool, device=x.device).tril(diagonal=past)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.c_fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd)
        self.c_proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd)
        self.c_proj.residual_scale = True
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # GPT-2 used the tanh approximation of GELU
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x), approximate="tanh")))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd, eps=1e-5)
        self.attn = CausalSelfAttention(cfg, layer)
        self.ln_2 = nn.LayerNorm(cfg.n_embd, eps=1e-5)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, cache: Cache | None = None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), cache)
        x = x + self.mlp(self.ln_2(x))
        return x


class GPT(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        V = cfg.padded_vocab_size
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(V, cfg.n_embd),
                wpe=nn.Embedding(cfg.seq_len, cfg.n_embd),
                drop=nn.Dropout(cfg.dropout),
                h=nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layer)),
                ln_f=nn.LayerNorm(cfg.n_embd, eps=1e-5),
            )
        )
        self.lm_head = nn.Linear(cfg.n_embd, V, bias=False)
        self.lm_head.weight = self.transformer.wte.weight  # tied input/output embeddings
        self.apply(self._init_weights)

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            std = 0.02
            if getattr(module, "residual_scale", False):
                # residual projections: 2 per block add to the stream
                std *= 1.0 / math.sqrt(2 * self.config.n_layer)
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    # How from_pretrained loads: gptlab.checkpoint.load_model, set by the package (gptlab.GPT). The
    # loaders build GPTs, so this module cannot import them without an import circle.
    _loader: ClassVar[Callable[..., tuple["GPT", str]] | None] = None

    @classmethod
    def from_pretrained(cls, model: Any, device: Any = "cpu") -> "GPT":
        """A GPT from anything `gptlab sample` takes as MODEL: a run directory (its latest
        checkpoint), a checkpoint or model directory, a local Hugging Face GPT-2 directory, or a hub
        id ('gpt2', 'gpt2-medium', ..., 'owner/name'). In eval mode, on device."""
        if GPT._loader is None:
            raise RuntimeError("GPT.from_pretrained needs the loaders: use gptlab.GPT (from gptlab import GPT)")
        return GPT._loader(model, device)[0]

    def generate(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                 top_k: int | None = None, top_p: float = 1.0,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        """idx (B, T) token ids -> (B, T + max_new_tokens): each row continued by max_new_tokens
        sampled ids, as nanoGPT's GPT.generate (no stop token). temperature 0 is greedy; top_k
        (None or 0: off) and top_p (1: off) cut the candidates; draws use `generator`, else torch's
        global RNG. The keys and values are cached (gptlab.generate.KVCache); once the context is
        full, each step sees the last seq_len tokens, as nanoGPT crops them."""
        from gptlab.generate import KVCache, check_sampling, sample_next

        if idx.dim() != 2 or idx.dtype != torch.long:
            raise ValueError(f"idx must be a (B, T) LongTensor of token ids, got {idx.dtype} of shape {tuple(idx.shape)}")
        if idx.size(1) < 1:
            raise ValueError("idx is empty; give at least one token per row (e.g. 50256, <|endoftext|>)")
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        check_sampling(temperature, top_k, top_p)
        T_max = self.config.seq_len
        out = idx
        was_training = self.training
        self.eval()
        try:
            with torch.no_grad():
                if max_new_tokens == 0:
                    return idx.clone()
                ctx = idx[:, -T_max:]  # a longer prompt: the model sees its last seq_len tokens
                cache = KVCache.for_model(self, idx.size(0), max_len=min(T_max, ctx.size(1) + max_new_tokens - 1))
                logits = self.logits(self.hidden(ctx, cache)[:, -1, :])
                for step in range(max_new_tokens):
                    nxt = sample_next(logits, temperature, top_k, top_p, generator).unsqueeze(1)  # (B, 1)
                    out = torch.cat([out, nxt.to(idx.dtype)], dim=1)
                    if step == max_new_tokens - 1:
                        break
                    if cache.pos < cache.max_len:
                        h = self.hidden(nxt, cache)
                    else:  # the context is full: slide it, without the cache
                        h = self.hidden(out[:, -T_max:])
                    logits = self.logits(h[:, -1, :])
        finally:
            self.train(was_training)
        return out

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def hidden(self, idx: torch.Tensor, cache: Cache | None = None) -> torch.Tensor:
        """idx (B, T) token ids -> the final normed hidden states (B, T, C).

        With a cache, positions continue from cache.pos and the cache advances by T. Under FSDP
        this is registered as a forward method (parallel.py), so calling it directly is safe."""
        B, T = idx.shape
        start = cache.pos if cache is not None else 0
        # (B, T) per-token positions of a ragged or packed batch, if any: their provider keeps them
        # within the context (a packed row may be longer than the context; its positions are not)
        pos = cache.positions if cache is not None else None
        if pos is None:
            if start + T > self.config.seq_len:
                raise ValueError(
                    f"sequence of {start + T} tokens is longer than the context ({self.config.seq_len})"
                )
            pos = torch.arange(start, start + T, dtype=torch.long, device=idx.device)
        x = self.transformer.wte(idx) + self.transformer.wpe(pos)  # (B, T, C)
        x = self.transformer.drop(x)
        for block in self.transformer.h:
            x = block(x, cache)
        if cache is not None:
            cache.pos += T
        return self.transformer.ln_f(x)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """Hidden states (..., C) -> logits over the real vocabulary (..., vocab_size).
        The padded rows of the output layer are dropped: they are not tokens."""
        return self.lm_head(h)[..., : self.config.vocab_size]

    def loss(self, h: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100,
             fused: bool = True) -> torch.Tensor:
        """Mean cross-entropy of the next tokens `targets` (B, T) given hidden states h (B, T, C).

        fused (and gradients on): the output layer's loss and gradients are computed together,
        chunk by chunk (FusedHeadLoss), so the (B, T, 50304) logits are never held whole.
        Otherwise plain cross-entropy over the logits (what torch.compile fuses well)."""
        V = self.config.vocab_size
        if fused and torch.is_grad_enabled():
            return FusedHeadLoss.apply(h.reshape(-1, h.size(-1)), self.lm_head.weight, targets.reshape(-1),
                                       V, ignore_index)
        return F.cross_entropy(self.logits(h).reshape(-1, V), targets.reshape(-1), ignore_index=ignore_index)

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        cache: Cache | None = None,
        ignore_index: int = -100,
        return_logits: bool = True,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """idx (B, T) -> (logits (B, T, vocab_size), mean cross-entropy over targets (B, T)).

        The entry point that wrappers (DDP, FSDP, torch.compile) see. return_logits=False with
        targets uses the fused output-layer loss and returns None for the logits."""
        h = self.hidden(idx, cache)
        if targets is not None and not return_logits and torch.is_grad_enabled():
            return None, self.loss(h, targets, ignore_index, fused=True)
        logits = self.logits(h)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1),
                                   ignore_index=ignore_index)
        return logits, loss


class FusedHeadLoss(torch.autograd.Function):
    """Mean cross-entropy of (x @ W.T) over the real vocabulary, with the gradients for x and W
    computed in the same pass, a chunk of rows at a time. Same arithmetic as lm_head + cross_entropy,
    but no (N, V) logits, log-softmax or gradient tensor is ever materialised: the softmax and its
    gradient are written over each chunk's logits in place, and the weight gradient is accumulated
    in place (addmm_) chunk after chunk, never as a V x C temporary per chunk. Chunks are large
    (up to 128 MiB of logits on a CPU, 1 GiB on CUDA): each chunk is another pass over W and its
    gradient, which on a CPU costs more than the chunk's logits falling out of cache (2^25 elements
    ran the gpt2 head about 1.5x faster than 2^22, benchmarks/RESULTS.md).

    Precision: matmuls run in the autocast dtype if one is active, with fp32 outputs on CUDA; the
    softmax, the loss and the accumulated gradients are fp32. The per-logit gradient is kept
    unnormalised, (softmax - onehot) in [-1, 1], when it is cast to the matmul dtype: divided by
    the token count first (65,536 tokens, say), it would underflow fp16. The 1/n and the incoming
    gradient (a loss scale under fp16) are applied in fp32, in backward."""

    CHUNK_ELEMENTS = 1 << 25  # CPU: rows per chunk x padded vocab, 128 MiB of fp32 logits at most
    CUDA_CHUNK_BYTES = 1 << 30  # CUDA: at most this much chunk memory (and 1/8 of what is free)

    @staticmethod
    def chunk_rows(device: torch.device, padded_vocab: int, n_rows: int, free_bytes: int | None = None) -> int:
        """Rows per chunk: CHUNK_ELEMENTS logits at most on a CPU; on CUDA a few large chunks (a multiple of 64 rows)
        within CUDA_CHUNK_BYTES and an eighth of the free memory. A chunk holds about 10 bytes per
        logit: its fp32 logits, the matmul-dtype copy and the gradient."""
        if device.type != "cuda":
            return max(1, min(n_rows, FusedHeadLoss.CHUNK_ELEMENTS // padded_vocab))
        if free_bytes is None:
            free_bytes = FusedHeadLoss.free_cuda_bytes(device)
        budget = min(FusedHeadLoss.CUDA_CHUNK_BYTES, free_bytes // 8)
        rows = budget // (10 * padded_vocab) // 64 * 64
        return max(64, min(rows, n_rows))

    @staticmethod
    def free_cuda_bytes(device: torch.device) -> int:
        """Memory a chunk can take: the device's free bytes plus the caching allocator's reserved
        but unused blocks, which mem_get_info counts as used (after the first step, most of it)."""
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return torch.cuda.mem_get_info(device)[0] + max(0, cached)

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, vocab_size: int,
                ignore_index: int) -> torch.Tensor:
        N, C = x.shape
        Vp = weight.size(0)
        dev = x.device.type
        mm_dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype
        with torch.autocast(dev, enabled=False):
            w = weight.to(mm_dtype)
            xs = x.to(mm_dtype)
            valid = targets != ignore_index
            n_valid = valid.sum().clamp(min=1).to(torch.float32)
            safe_t = torch.where(valid, targets, torch.zeros_like(targets))
            # both gradients are accumulated unnormalised (sum over tokens); backward divides by n
            grad_x = torch.empty(N, C, dtype=torch.float32, device=x.device)
            grad_w = torch.empty(Vp, C, dtype=torch.float32, device=x.device)
            loss = torch.zeros((), dtype=torch.float32, device=x.device)
            rows = FusedHeadLoss.chunk_rows(x.device, Vp, N)
            for a in range(0, N, rows):
                b = min(a + rows, N)
                logits = _mm_fp32(xs[a:b], w.t())  # (c, Vp) fp32
                if Vp > vocab_size:
                    logits[:, vocab_size:] = float("-inf")
                lse = torch.logsumexp(logits, dim=1)  # (c,)
                t = safe_t[a:b]
                ar = torch.arange(b - a, device=x.device)
                m = valid[a:b].float()
                loss += ((lse - logits[ar, t]) * m).sum()
                # d(summed loss)/d(logits) = (softmax - onehot) * valid, in place over the logits
                probs = logits.sub_(lse.unsqueeze(1)).exp_()
                probs[ar, t] -= 1.0
                probs.mul_(m.unsqueeze(1))
                g = probs.to(mm_dtype)  # (c, Vp), entries in [-1, 1]
                _mm_fp32_into(grad_x[a:b], g, w)
                _mm_fp32_into(grad_w, g.t(), xs[a:b], accumulate=a > 0)  # (Vp, C)
                del logits, probs, g  # freed before the next chunk's logits: one chunk at a time
        ctx.save_for_backward(grad_x, grad_w, n_valid)
        ctx.dtypes = (x.dtype, weight.dtype)
        return loss / n_valid

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        grad_x, grad_w, n_valid = ctx.saved_tensors
        x_dtype, w_dtype = ctx.dtypes
        # the incoming gradient (a loss scale under fp16) and 1/n meet the sums in fp32, then cast
        # in place: each is a (N, C) or (V, C) fp32 buffer this backward is the only user of
        scale = grad_out.float() / n_valid
        return grad_x.mul_(scale).to(x_dtype), grad_w.mul_(scale).to(w_dtype), None, None, None


def _mm_fp32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b as fp32. On CUDA a half-precision product accumulates and is written in fp32
    (out_dtype), never rounded to fp16/bf16 on the way; elsewhere the product is upcast."""
    if a.dtype != torch.float32 and a.is_cuda:
        return torch.mm(a, b, out_dtype=torch.float32)
    return (a @ b).float()


def _mm_fp32_into(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, accumulate: bool = False) -> None:
    """out (fp32) = a @ b, or out += a @ b with accumulate. In fp32 the product is written or added
    in place (addmm_: no temporary the size of out, which for the head's weight gradient is V x C);
    a half-precision product goes through _mm_fp32."""
    if a.dtype == torch.float32:
        out.addmm_(a, b, beta=1.0 if accumulate else 0.0)  # beta 0: out's old contents are ignored
    elif accumulate:
        out += _mm_fp32(a, b)
    else:
        out.copy_(_mm_fp32(a, b))
