"""The memory plan: what one GPU holds while training, from the model's shape and the run's settings.

`gptlab plan ...` and `gptlab train ... --dry-run` print it. No torch here: it is arithmetic on the
config. With N parameters (the tied embedding once), W ranks, B sequences of T tokens per micro-batch,
width C, L layers, padded vocabulary V, and b the bytes of the compute dtype (4 fp32, 2 bf16/fp16):

  parameters   4 N / S          fp32 master weights (S = W under FSDP, else 1)
  gradients    4 N / S          fp32
  optimizer    8 N / S          AdamW's two fp32 moments
  working      FSDP: (E + 2 K) b + (E + K) 4   the unsharded embeddings E = (V + T) C (the root unit,
                                 held for the whole step) and two blocks of K = 12 C^2 + 13 C (the
                                 current one and the prefetched one), plus their unsharded gradients;
               no FSDP, b < 4: N b     autocast's low-precision copies of the weights, kept for backward
  activations  L B T C a  +  B T C 8  +  head
               a = 68 bytes in fp32 (17 values of C per token per layer are saved for backward:
                   ln_1 and ln_2 inputs, the attention input, q, k, v, the attention output, the
                   c_proj input, the MLP input, and 4 C each for the GELU input and output), 38 under
                   autocast (the two LayerNorm inputs stay fp32: 2 x 4 + 15 x 2)
               B T C 8: the final LayerNorm input and the fused head's input gradient (fp32)
               head: uncompiled, the fused loss keeps a V x C fp32 weight gradient and one chunk of
                   K = min(B T V, 2^25) fp32 logits (the CPU's chunk; the softmax and its gradient
                   overwrite them), plus their b-byte copy under autocast: 4 V C + K (4 + b), or 4 V C + 4 K
                   in fp32 (CUDA sizes its chunks from its free memory, up to 1 GiB: not modelled here);
                   compiled, the logits and their fp32 softmax (B T V (b + 4))
  total        the sum; it fits when total + 1 GiB (CUDA context, allocator slack) <= --gpu-memory

Checked against measured peak memory of CPU runs in benchmarks/plan_memory.py (see README).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from gptlab.config import PRESETS, ModelConfig, TrainConfig, read_json
from gptlab.errors import UserError
from gptlab.hf_config import GPT2_HUB_NAMES, model_config_from_hf
from gptlab.units import parse_size

GIB = 1 << 30
RESERVE = 1 * GIB  # CUDA context, cuBLAS workspaces, caching-allocator slack
CHUNK_ELEMENTS = 1 << 25  # model.FusedHeadLoss.CHUNK_ELEMENTS: at most rows x padded vocab logits per chunk
DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}


@dataclass
class MemoryPlan:
    model: ModelConfig
    world_size: int
    fsdp: bool
    dtype: str
    batch_size: int
    compiled: bool
    gpu_memory: int | None = None

    @property
    def shards(self) -> int:
        return self.world_size if self.fsdp else 1

    @property
    def n_params(self) -> int:
        return self.model.num_params()

    def parameters(self) -> int:
        return 4 * self.n_params // self.shards

    def gradients(self) -> int:
        return 4 * self.n_params // self.shards

    def optimizer(self) -> int:
        return 8 * self.n_params // self.shards

    def working(self) -> int:
        """Full-size copies beside the (sharded) fp32 weights: FSDP's unsharded units, or autocast's casts."""
        cfg, b = self.model, DTYPE_BYTES[self.dtype]
        C = cfg.n_embd
        if self.fsdp:
            embed = (cfg.padded_vocab_size + cfg.seq_len) * C + 2 * C
            block = 12 * C * C + 13 * C
            return (embed + 2 * block) * b + (embed + block) * 4
        return self.n_params * b if b < 4 else 0

    def activations(self) -> int:
        cfg, b = self.model, DTYPE_BYTES[self.dtype]
        B, T, C, L, V = self.batch_size, cfg.seq_len, cfg.n_embd, cfg.n_layer, cfg.padded_vocab_size
        per_layer = 68 if b == 4 else 38
        if cfg.dropout > 0:
            per_layer += 3  # three 1-byte masks (attention output, residual, MLP) per C
        chunk = min(B * T, max(1, CHUNK_ELEMENTS // V)) * V  # logits: model.FusedHeadLoss.chunk_rows on a CPU
        head = B * T * V * (b + 4) if self.compiled else 4 * V * C + chunk * (4 + (b if b < 4 else 0))
        return L * B * T * C * per_layer + B * T * C * 8 + head

    def total(self) -> int:
        return self.parameters() + self.gradients() + self.optimizer() + self.working() + self.activations()

    def fits(self) -> bool | None:
        return None if self.gpu_memory is None else self.total() + RESERVE <= self.gpu_memory

    def largest_batch(self) -> int:
        """The largest power-of-two micro-batch that fits --gpu-memory (0: not even one sequence)."""
        assert self.gpu_memory is not None
        best, b = 0, 1
        while b <= 4096:
            trial = MemoryPlan(**{**self.__dict__, "batch_size": b})
            if not trial.fits():
                break
            best, b = b, b * 2
        return best

    def render(self) -> str:
        cfg = self.model
        lines = [
            f"memory plan per GPU: {self.n_params / 1e6:.1f}M parameters (L={cfg.n_layer}, C={cfg.n_embd}, "
            f"T={cfg.seq_len}), {self.world_size} rank(s), FSDP {'on' if self.fsdp else 'off'}, {self.dtype}, "
            f"micro-batch {self.batch_size}, compile {'on' if self.compiled else 'off'}",
            f"  parameters   {_gib(self.parameters())}",
            f"  gradients    {_gib(self.gradients())}",
            f"  optimizer    {_gib(self.optimizer())}   (AdamW: two fp32 moments)",
            f"  working      {_gib(self.working())}   "
            + ("(unsharded embeddings + 2 blocks, and their gradients)" if self.fsdp
               else "(autocast's weight copies)" if self.working() else ""),
            f"  activations  {_gib(self.activations())}",
            f"  total        {_gib(self.total())}",
        ]
        if self.gpu_memory is not None:
            verdict = "fits" if self.fits() else "does NOT fit"
            lines.append(f"  {verdict} in {self.gpu_memory / GIB:.2f} GiB (total + {RESERVE / GIB:.0f} GiB for the CUDA "
                         f"context); the largest power-of-two micro-batch that fits: {self.largest_batch()}")
        return "\n".join(line.rstrip() for line in lines)


def _gib(n: int) -> str:
    return f"{n / GIB:8.2f} GiB"


def plan_for(model: ModelConfig, *, world_size: int, fsdp: bool, dtype: str, batch_size: int | str,
             compiled: bool, gpu_memory: str | None) -> MemoryPlan:
    """A plan from train settings; batch_size 'auto' plans the largest that fits --gpu-memory."""
    if dtype == "auto":
        dtype = "bf16"  # what a current GPU trains in
    if dtype not in DTYPE_BYTES:
        raise UserError(f"--dtype {dtype!r}: choose fp32, bf16 or fp16")
    if world_size < 1:
        raise UserError("the world size must be at least 1")
    mem = parse_size(gpu_memory, "--gpu-memory") if gpu_memory is not None else None
    plan = MemoryPlan(model, world_size, fsdp, dtype, 1, compiled, mem)
    if batch_size == "auto":
        if mem is None:
            raise UserError("--batch-size auto in a plan needs --gpu-memory SIZE to choose a size")
        plan.batch_size = max(1, plan.largest_batch())
    else:
        plan.batch_size = int(batch_size)
    return plan


def model_for_plan(cfg: TrainConfig) -> ModelConfig:
    """The model a run would train: the preset (with overrides), or the shape of --init-from when it
    names a GPT-2 hub id, a gptlab model directory or a Hugging Face directory (no weights are read)."""
    if not cfg.init_from:
        return cfg.model_config()
    name = cfg.init_from.split("/")[-1] if cfg.init_from.startswith("openai-community/") else cfg.init_from
    if name in GPT2_HUB_NAMES:
        base = PRESETS[name].to_dict()
    else:
        found = [p for p in (Path(cfg.init_from), Path(cfg.init_from) / "model") if (p / "config.json").is_file()]
        if not found:
            raise UserError(f"--init-from {cfg.init_from}: the plan needs its shape; give a local model directory "
                            f"or a gpt2* hub id")
        raw = read_json(found[0] / "config.json")
        if "model_type" in raw or "n_positions" in raw:  # a Hugging Face GPT-2 config
            base = model_config_from_hf(found[0], raw).to_dict()
        else:
            base = ModelConfig.from_dict(raw).to_dict()
    if cfg.seq_len is not None:
        base["seq_len"] = cfg.seq_len
    return ModelConfig(**base)


def plan_from_train_config(cfg: TrainConfig, world_size: int) -> MemoryPlan:
    """The plan for `gptlab train` with these settings on `world_size` ranks. The plan is per GPU:
    dtype auto means bf16 and compile defaults on, unless --device cpu (fp32, uncompiled)."""
    on_cpu = (cfg.device or "").startswith("cpu")
    dtype = "fp32" if (cfg.dtype == "auto" and on_cpu) else cfg.dtype
    compiled = cfg.compile if cfg.compile is not None else not on_cpu
    return plan_for(model_for_plan(cfg), world_size=world_size, fsdp=cfg.fsdp, dtype=dtype,
                    batch_size=cfg.batch_size, compiled=compiled, gpu_memory=cfg.gpu_memory)
