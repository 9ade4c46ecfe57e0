"""The plan of a training run: what one GPU holds, and how long and how much the run takes.

`gptlab plan ...` and `gptlab train ... --dry-run` print it. No torch here: it is arithmetic on the
config. With N parameters (the tied embedding once), W ranks, B sequences of T tokens per micro-batch,
A micro-batches per step (gradient accumulation), width C, L layers, padded vocabulary V, and b the
bytes of the compute dtype (4 fp32, 2 bf16/fp16):

  parameters   4 N / S          fp32 master weights (S = W under FSDP, else 1)
  gradients    4 N / S          fp32. Under DDP they are views of its all-reduce buckets
                                 (gradient_as_bucket_view): the buckets are the gradients, no second
                                 copy, kept (zeroed, not freed) between steps
  unsharded    FSDP, A > 1: 4 N  FSDP2 holds every unsharded gradient between the micro-batches of a
                                 step (set_requires_gradient_sync(False)), upcast to the fp32
                                 reduce dtype (torch.distributed.fsdp's FSDPParam.to_accumulated_grad_if_needed)
  optimizer    8 N / S          AdamW's two fp32 moments
  working      FSDP: (E + 2 K) 4 + (E + K) 4   the unsharded fp32 embeddings E = (V + T) C (the root
                                 unit, held for the whole step) and two blocks of K = 12 C^2 + 13 C (the
                                 current one and the prefetched one; FSDP gathers fp32 weights and
                                 autocast casts them, as under DDP), plus their unsharded gradients
                                 (with A > 1 those are in `unsharded`);
               b < 4: + N b     autocast's low-precision copies of the weights, kept for backward
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
                   compiled (without FSDP, which compiles the blocks only), the logits and their fp32
                   softmax (B T V (b + 4))
  transient    peaks outside the forward's: the tied embedding's backward holds the head's weight
               gradient, the embedding's and their sum (3 x 4 V C); DDP rebuilds its buckets once,
               after the first step, in the order gradients arrived (4 N beside the old ones)
  total        parameters + unsharded + optimizer + the larger of the forward's end (the working weights,
               activations, and the gradients held then: DDP's buckets, or accumulated ones) and the
               backward's end (gradients, FSDP's working gradients and root, transient)
  reserve      device memory outside PyTorch's tensors (RESERVE_* below, with their sources)
  needed       total + reserve; it fits when needed <= --gpu-memory

The total is checked against the measured peak of live tensors (torch's MemTracker) of CPU runs on
one process and on 2 gloo ranks under DDP and FSDP: tests/test_plan.py, benchmarks/plan_memory.py.

The time: tokens/s from a `gptlab bench --json` result (--bench FILE; its tokens/s per rank times
W: linear scaling is assumed), or from the device's peak FLOP/s and a stated --mfu
(tokens/s = MFU x peak x W / training FLOPs per token). Time to finish = the run's tokens / tokens/s;
GPU-hours = hours x W; cost = GPU-hours x --gpu-hour-price. Evaluation and checkpoint time are not in it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from gptlab.config import PRESETS, ModelConfig, TrainConfig, read_json
from gptlab.errors import UserError
from gptlab.hf_config import GPT2_HUB_NAMES, model_config_from_hf
from gptlab.units import parse_size

GIB = 1 << 30
MIB = 1 << 20
CHUNK_ELEMENTS = 1 << 25  # model.FusedHeadLoss.CHUNK_ELEMENTS: at most rows x padded vocab logits per chunk
DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}

# The reserve: GPU memory no PyTorch tensor accounts for. Documented figures, not measured here
# (`make gpu-check` records a GPU's own); each is per GPU.
RESERVE_CUDA_CONTEXT = 512 * MIB
"""The CUDA context (driver, loaded kernels): 200-700 MB in pytorch/pytorch#20532 and #28113,
~300 MB with lazy module loading (CUDA >= 11.7) in #107667. 512 MiB."""
RESERVE_BLAS = 64 * MIB
"""cuBLAS and cuBLASLt workspaces: 32 MiB each on Hopper, the size NVIDIA recommends and PyTorch
allocates since pytorch/pytorch#120925 (4 MiB on older GPUs), one per handle and stream."""
RESERVE_NCCL = 1536 * MIB
"""NCCL's buffers, with W > 1: NCCL_BUFFSIZE (4 MiB) per channel per peer and protocol, linear in the
channels (NVIDIA/nccl#986, #1450); 1.06 GB per GPU for one communicator on 8 x H100 (NVIDIA/nccl#1685),
~1.6 GB after an all-reduce (NVIDIA/nccl#864). 1.5 GiB; set NCCL_BUFFSIZE or fewer channels to shrink it."""
RESERVE_FRAGMENTATION = 0.05
"""The caching allocator's rounding and fragmentation, as a fraction of the tensors' total: an
estimate (blocks round to 512 B and 2 MiB segments; PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
keeps it low); `make gpu-check` records max reserved over max allocated on a real GPU."""


@dataclass
class MemoryPlan:
    model: ModelConfig
    world_size: int
    fsdp: bool
    dtype: str
    batch_size: int
    compiled: bool
    gpu_memory: int | None = None
    accum: int = 1
    """Micro-batches per optimizer step (gradient accumulation)."""

    @property
    def shards(self) -> int:
        return self.world_size if self.fsdp else 1

    @property
    def n_params(self) -> int:
        return self.model.num_params()

    @property
    def ddp(self) -> bool:
        return self.world_size > 1 and not self.fsdp

    def parameters(self) -> int:
        return 4 * self.n_params // self.shards

    def gradients(self) -> int:
        return 4 * self.n_params // self.shards

    def unsharded_gradients(self) -> int:
        return 4 * self.n_params if self.fsdp and self.accum > 1 else 0

    def optimizer(self) -> int:
        return 8 * self.n_params // self.shards

    def working_params(self) -> int:
        """Full-size weight copies beside the (sharded) fp32 weights: FSDP's unsharded units (the
        embeddings E, held all step, and two blocks), or autocast's casts (kept for backward)."""
        b = DTYPE_BYTES[self.dtype]
        casts = self.n_params * b if b < 4 else 0  # autocast's copies, saved for backward, FSDP or not
        if self.fsdp:  # FSDP gathers the fp32 weights (no param_dtype: parallel.shard_model)
            return (self._embed() + 2 * self._block()) * 4 + casts
        return casts

    def working_grads(self) -> int:
        """FSDP without accumulation: the unsharded gradients of the root and of one block, in backward
        (with accumulation they are in unsharded_gradients())."""
        return (self._embed() + self._block()) * 4 if self.fsdp and self.accum == 1 else 0

    def working(self) -> int:
        return self.working_params() + self.working_grads()

    def _embed(self) -> int:
        C = self.model.n_embd
        return (self.model.padded_vocab_size + self.model.seq_len) * C + 2 * C

    def _block(self) -> int:
        C = self.model.n_embd
        return 12 * C * C + 13 * C

    def activations(self) -> int:
        cfg, b = self.model, DTYPE_BYTES[self.dtype]
        B, T, C, L, V = self.batch_size, cfg.seq_len, cfg.n_embd, cfg.n_layer, cfg.padded_vocab_size
        per_layer = 68 if b == 4 else 38
        if cfg.dropout > 0:
            per_layer += 3  # three 1-byte masks (attention output, residual, MLP) per C
        chunk = min(B * T, max(1, CHUNK_ELEMENTS // V)) * V  # logits: model.FusedHeadLoss.chunk_rows on a CPU
        head = B * T * V * (b + 4) if self.compiled and not self.fsdp else 4 * V * C + chunk * (4 + (b if b < 4 else 0))
        return L * B * T * C * per_layer + B * T * C * 8 + head

    def transient(self) -> int:
        """The largest peak outside the forward's end: the tied embedding's backward, or DDP's bucket rebuild."""
        tied = 3 * 4 * self.model.padded_vocab_size * self.model.n_embd
        return max(tied, 4 * self.n_params if self.ddp else 0)

    def gradients_in_forward(self) -> int:
        """Gradients alive at the forward's end: DDP's buckets always; without FSDP, the accumulated ones
        (train_step frees the others between steps; FSDP's are in unsharded_gradients())."""
        return self.gradients() if self.ddp or (not self.fsdp and self.accum > 1) else 0

    def forward_peak(self) -> int:
        """Beyond parameters, optimizer state and unsharded gradients, at the forward's end."""
        return self.working_params() + self.activations() + self.gradients_in_forward()

    def backward_peak(self) -> int:
        """... at the backward's end (the tied embedding) or at DDP's bucket rebuild."""
        root = self._embed() * 4 if self.fsdp else 0  # FSDP's root stays unsharded (fp32)
        return self.gradients() + self.working_grads() + root + self.transient()

    def total(self) -> int:
        """The peak of live tensors."""
        held = self.parameters() + self.unsharded_gradients() + self.optimizer()
        return held + max(self.forward_peak(), self.backward_peak())

    def reserve_parts(self) -> dict[str, int]:
        return {"cuda_context": RESERVE_CUDA_CONTEXT, "blas_workspaces": RESERVE_BLAS,
                "nccl": RESERVE_NCCL if self.world_size > 1 else 0,
                "allocator": int(RESERVE_FRAGMENTATION * self.total())}

    def reserve(self) -> int:
        return sum(self.reserve_parts().values())

    def needed(self) -> int:
        return self.total() + self.reserve()

    def fits(self) -> bool | None:
        return None if self.gpu_memory is None else self.needed() <= self.gpu_memory

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

    def to_dict(self) -> dict:
        cfg = self.model
        d = {"params": self.n_params, "n_layer": cfg.n_layer, "n_embd": cfg.n_embd, "seq_len": cfg.seq_len,
             "world_size": self.world_size, "fsdp": self.fsdp, "dtype": self.dtype, "batch_size": self.batch_size,
             "grad_accum": self.accum, "compiled": self.compiled,
             "bytes": {"parameters": self.parameters(), "gradients": self.gradients(),
                       "unsharded_gradients": self.unsharded_gradients(), "optimizer": self.optimizer(),
                       "working": self.working(), "activations": self.activations(),
                       "transient": self.transient(), "forward_peak": self.forward_peak(),
                       "backward_peak": self.backward_peak(), "total": self.total(), "reserve": self.reserve_parts(),
                       "needed": self.needed()},
             "gpu_memory": self.gpu_memory, "fits": self.fits()}
        if self.gpu_memory is not None:
            d["largest_batch"] = self.largest_batch()
        return d

    def render(self) -> str:
        cfg = self.model
        r = self.reserve_parts()
        lines = [
            f"memory plan per GPU: {self.n_params / 1e6:.1f}M parameters (L={cfg.n_layer}, C={cfg.n_embd}, "
            f"T={cfg.seq_len}), {self.world_size} rank(s), FSDP {'on' if self.fsdp else 'off'}, {self.dtype}, "
            f"micro-batch {self.batch_size} x {self.accum} accumulated, compile {'on' if self.compiled else 'off'}",
            f"  parameters   {_gib(self.parameters())}",
            f"  gradients    {_gib(self.gradients())}" + ("   (DDP's buckets: gradient_as_bucket_view)" if self.ddp else ""),
        ]
        if self.unsharded_gradients():
            lines.append(f"  unsharded    {_gib(self.unsharded_gradients())}   (FSDP's gradients between micro-batches)")
        lines += [
            f"  optimizer    {_gib(self.optimizer())}   (AdamW: two fp32 moments)",
            f"  working      {_gib(self.working())}   "
            + ("(unsharded embeddings + 2 blocks" + (", and their gradients)" if self.accum == 1 else ")")
               if self.fsdp else "(autocast's weight copies)" if self.working() else ""),
            f"  activations  {_gib(self.activations())}",
            f"  transient    {_gib(self.transient())}   (tied embedding's backward"
            + (", DDP's bucket rebuild)" if self.ddp else ")"),
            f"  total        {_gib(self.total())}   (live tensors at the peak: the "
            + ("forward's end)" if self.forward_peak() >= self.backward_peak() else "backward's end)"),
            f"  reserve      {_gib(self.reserve())}   (CUDA context {r['cuda_context'] / GIB:.2f}, cuBLAS workspaces "
            f"{r['blas_workspaces'] / GIB:.2f}, NCCL {r['nccl'] / GIB:.2f}, allocator "
            f"{RESERVE_FRAGMENTATION:.0%} of the total {r['allocator'] / GIB:.2f})",
            f"  needed       {_gib(self.needed())}",
        ]
        if self.gpu_memory is not None:
            verdict = "fits" if self.fits() else "does NOT fit"
            lines.append(f"  {verdict} in {self.gpu_memory / GIB:.2f} GiB; the largest power-of-two micro-batch "
                         f"that fits: {self.largest_batch()}")
        return "\n".join(line.rstrip() for line in lines)


def _gib(n: int) -> str:
    return f"{n / GIB:8.2f} GiB"


def plan_for(model: ModelConfig, *, world_size: int, fsdp: bool, dtype: str, batch_size: int | str,
             compiled: bool, gpu_memory: str | None, accum: int | None = None,
             total_batch_tokens: int | None = None) -> MemoryPlan:
    """A plan from train settings; batch_size 'auto' plans the largest that fits --gpu-memory. The
    accumulation is `accum`, or what total_batch_tokens asks of the micro-batch (else 1)."""
    if dtype == "auto":
        dtype = "bf16"  # what a current GPU trains in
    if dtype not in DTYPE_BYTES:
        raise UserError(f"--dtype {dtype!r}: choose fp32, bf16 or fp16")
    if world_size < 1:
        raise UserError("the world size must be at least 1")
    mem = parse_size(gpu_memory, "--gpu-memory") if gpu_memory is not None else None

    def steps_for(b: int) -> int:
        if accum is not None:
            return accum
        if total_batch_tokens is None:
            return 1
        return max(1, total_batch_tokens // (b * model.seq_len * world_size))

    plan = MemoryPlan(model, world_size, fsdp, dtype, 1, compiled, mem, steps_for(1))
    if batch_size == "auto":
        if mem is None:
            raise UserError("--batch-size auto in a plan needs --gpu-memory SIZE to choose a size")
        b = 1  # the largest power of two that fits, each with its own accumulation
        while b <= 4096 and MemoryPlan(model, world_size, fsdp, dtype, b * 2, compiled, mem, steps_for(b * 2)).fits():
            b *= 2
        plan.batch_size = b
    else:
        plan.batch_size = int(batch_size)
    plan.accum = steps_for(plan.batch_size)
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
                    batch_size=cfg.batch_size, compiled=compiled, gpu_memory=cfg.gpu_memory,
                    total_batch_tokens=cfg.total_batch_tokens)


# ----------------------------------------------------------------------------- time and cost

BENCH_KEYS = ("model", "params", "ranks", "seq_len", "batch_size", "dtype", "compiled", "tokens_per_s")


@dataclass
class TimePlan:
    """How long the run takes and what it costs, at a throughput whose source it names."""

    tokens_per_s: float
    """Of the whole run (every rank)."""
    source: str
    tokens: int | None
    """The run's tokens (None: --epochs, whose count needs the data)."""
    steps: int | None
    world_size: int
    gpu_hour_price: float | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def seconds(self) -> float | None:
        return None if self.tokens is None else self.tokens / self.tokens_per_s

    @property
    def gpu_hours(self) -> float | None:
        s = self.seconds
        return None if s is None else s / 3600 * self.world_size

    @property
    def cost(self) -> float | None:
        h = self.gpu_hours
        return None if h is None or self.gpu_hour_price is None else h * self.gpu_hour_price

    def to_dict(self) -> dict:
        return {"tokens_per_s": self.tokens_per_s, "source": self.source, "tokens": self.tokens,
                "steps": self.steps, "seconds": self.seconds, "gpu_hours": self.gpu_hours,
                "gpu_hour_price": self.gpu_hour_price, "cost": self.cost, "notes": self.notes}

    def render(self) -> str:
        lines = [f"time ({self.source}):", f"  tokens/s     {self.tokens_per_s:,.0f}"]
        if self.tokens is None:
            lines.append("  to finish    unknown: --epochs needs the data's size; give --max-steps or --max-tokens")
        else:
            lines += [f"  to finish    {_duration(self.seconds)} for {self.tokens / 1e9:,.2f}B tokens "
                      f"({self.steps:,} steps)",
                      f"  GPU-hours    {self.gpu_hours:,.1f} ({self.world_size} GPU(s))"]
            if self.cost is not None:
                lines.append(f"  cost         {self.cost:,.2f} at {self.gpu_hour_price:,.2f} a GPU-hour")
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


def _duration(seconds: float) -> str:
    if seconds < 3600:
        return f"{seconds / 60:,.1f} min"
    return f"{seconds / 3600:,.2f} h" if seconds < 48 * 3600 else f"{seconds / 86400:,.2f} days"


def read_bench(path: str) -> dict:
    """A `gptlab bench --json` result, checked: one line for a missing, garbled or foreign file."""
    try:
        res = read_json(path, max_bytes=1 << 20)
    except UserError as e:  # a missing file, or one that is not JSON
        raise UserError(f"--bench {e}") from None
    missing = [k for k in BENCH_KEYS if k not in res]
    if missing:
        raise UserError(f"--bench {path}: not a `gptlab bench --json` result (no {', '.join(missing)})")
    good = (isinstance(res["tokens_per_s"], (int, float)) and not isinstance(res["tokens_per_s"], bool)
            and math.isfinite(res["tokens_per_s"]) and res["tokens_per_s"] > 0
            and isinstance(res["ranks"], int) and res["ranks"] >= 1 and isinstance(res["params"], int)
            and isinstance(res["seq_len"], int))
    if not good:
        raise UserError(f"--bench {path}: tokens_per_s must be a positive number and ranks, params and seq_len "
                        f"integers")
    return res


def peak_flops(gpu: str | None, peak_tflops: float | None, dtype: str) -> tuple[float, str]:
    """FLOP/s of one GPU from --peak-tflops, else from --gpu NAME's datasheet row (gptlab.runtime)."""
    if peak_tflops is not None:
        if not peak_tflops > 0:
            raise UserError(f"--peak-tflops {peak_tflops}: must be positive")
        return peak_tflops * 1e12, f"{peak_tflops:,.1f} TFLOP/s (--peak-tflops)"
    from gptlab.runtime import GPU_PEAKS, gpu_model  # imports torch: only for --gpu

    row = gpu_model(gpu or "")
    if row is None:
        known = ", ".join(name for _, name, _ in GPU_PEAKS)
        raise UserError(f"--gpu {gpu!r}: not a GPU gptlab knows the peak of ({known}); give --peak-tflops N")
    name, peaks = row
    key = "tf32" if dtype == "fp32" and peaks.get("tf32") else dtype
    if not peaks.get(key):
        raise UserError(f"--gpu {gpu}: the {name} has no native {dtype}; choose another --dtype")
    return peaks[key] * 1e12, f"{name} {dtype} peak {peaks[key]:,.1f} TFLOP/s"


def time_plan(cfg: TrainConfig, plan: MemoryPlan) -> TimePlan | None:
    """The run's time and cost from --bench FILE, or --mfu with --gpu / --peak-tflops; None without them."""
    price = cfg.gpu_hour_price
    if price is not None and not (math.isfinite(price) and price >= 0):
        raise UserError(f"--gpu-hour-price {price}: must be zero or more")
    if cfg.mfu is not None and not 0 < cfg.mfu <= 1:
        raise UserError(f"--mfu {cfg.mfu}: a fraction of the peak, in (0, 1]")
    W, T, notes = plan.world_size, plan.model.seq_len, []
    if cfg.bench is not None:
        if cfg.mfu is not None:
            raise UserError("--bench and --mfu both give the throughput: choose one")
        res = read_bench(cfg.bench)
        if res["params"] != plan.n_params or res["seq_len"] != T:
            raise UserError(f"--bench {cfg.bench}: measured {res['model']} ({res['params'] / 1e6:.1f}M parameters, "
                            f"T={res['seq_len']}); the plan is for {plan.n_params / 1e6:.1f}M parameters, T={T}")
        per_rank = res["tokens_per_s"] / res["ranks"]
        tok_s = per_rank * W
        source = (f"--bench {cfg.bench}: {res['tokens_per_s']:,.0f} tokens/s on {res['ranks']} rank(s)"
                  + (f", scaled linearly to {W}" if res["ranks"] != W else ""))
        asked = (plan.batch_size, plan.dtype, plan.compiled)
        got = (res["batch_size"], res["dtype"], res["compiled"])
        if asked != got:
            notes.append(f"the bench ran B={got[0]} {got[1]} compiled={got[2]}; the plan is B={asked[0]} "
                         f"{asked[1]} compiled={asked[2]}")
    elif cfg.mfu is not None:
        if cfg.gpu is None and cfg.peak_tflops is None:
            raise UserError("--mfu needs the device's peak: --gpu NAME (H100, A100, ...) or --peak-tflops N")
        peak, what = peak_flops(cfg.gpu, cfg.peak_tflops, plan.dtype)
        tok_s = cfg.mfu * peak * W / plan.model.flops_per_token(T)
        source = f"{what} x MFU {cfg.mfu:.0%} (stated, --mfu) x {W} GPU(s)"
    elif cfg.gpu is not None or cfg.peak_tflops is not None or price is not None:
        raise UserError("the time and cost need a throughput: --bench FILE (a `gptlab bench --json` result), "
                        "or --mfu FRACTION with --gpu NAME or --peak-tflops N")
    else:
        return None
    steps = None if cfg.epochs is not None and cfg.max_tokens is None else cfg.total_steps(0)
    tokens = None if steps is None else steps * cfg.total_batch_tokens
    return TimePlan(tok_s, source, tokens, steps, W, price, notes)
