"""`gptlab bench`: tokens/s, MFU and peak memory of a model preset on this device.

It runs the training step itself (train.train_step, with AdamW, clipping and a loss scale under
fp16) on random tokens, after warm-up steps that absorb compilation, so the numbers are what
training gets. Under torchrun (or --nproc N) every rank runs it and rank 0 reports the totals.
"""

from __future__ import annotations

import resource
import sys
import time

import torch

from gptlab import dist
from gptlab.config import BenchConfig
from gptlab.model import GPT
from gptlab.optim import make_adamw
from gptlab.parallel import place
from gptlab.runtime import Runtime, get_runtime, native_bf16_matmul, reuse_freed_host_memory
from gptlab.train import find_batch_size, train_step


def run_bench(cfg: BenchConfig) -> dict | None:
    """Measure; the result on rank 0, None on the other ranks."""
    cfg.validate()
    mcfg = cfg.model_config()
    rt = get_runtime(cfg.device, cfg.dtype, cfg.compile)
    if rt.device.type == "cpu":
        reuse_freed_host_memory()  # as training does: no page faults for each step's buffers
    env = dist.init(rt.device.type, timeout_s=cfg.dist_timeout)
    rt.device = env.device(rt.device)
    if rt.dtype == torch.bfloat16 and not native_bf16_matmul(rt.device) and env.is_main:
        print(f"gptlab bench: warning: bf16 is emulated on this {rt.device.type} (no native bf16 matmuls): "
              f"expect it far slower than fp32, and the numbers not to be bf16's", file=sys.stderr, flush=True)
    try:
        torch.manual_seed(cfg.seed)
        model = GPT(mcfg)
        n_params = model.num_params()
        placed = place(model, rt, env, fsdp=cfg.fsdp, compile_backend=cfg.compile_backend)
        T = mcfg.seq_len
        B = cfg.batch_size
        if B == "auto":  # candidates: the divisors of 512 sequences per rank
            B = find_batch_size(placed, rt, 512 * T * env.world_size, env)
        opt = make_adamw(model, lr=1e-4, weight_decay=0.1, betas=(0.9, 0.95), eps=1e-8, device_type=rt.device.type)
        scaler = torch.amp.GradScaler(rt.device.type) if rt.needs_grad_scaler else None
        gen = torch.Generator(device=rt.device).manual_seed(cfg.seed + 1 + env.rank)

        def step() -> float:
            tokens = torch.randint(0, mcfg.vocab_size, (B, T + 1), generator=gen, device=rt.device)
            return train_step(placed, rt, [(tokens[:, :-1], tokens[:, 1:])], 1, opt, scaler, grad_clip=1.0).loss

        for _ in range(cfg.warmup):
            step()
        rt.synchronize()
        if rt.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(rt.device)
        t0 = time.perf_counter()
        for _ in range(cfg.steps):
            loss = step()
        rt.synchronize()
        elapsed = time.perf_counter() - t0
        peak_mem = _peak_memory(rt, env)
    finally:
        dist.shutdown()
    tok_s = B * T * env.world_size * cfg.steps / elapsed
    peak = cfg.peak_tflops * 1e12 if cfg.peak_tflops else rt.peak_flops()
    flops = mcfg.flops_per_token(T)
    if not env.is_main:
        return None
    return {
        "model": cfg.model, "params": n_params, "device": rt.describe().split(", dtype")[0].removeprefix("device "),
        "dtype": rt.dtype_name,
        "compiled": placed.compiled, "fsdp": cfg.fsdp, "ranks": env.world_size, "batch_size": B, "seq_len": T,
        "steps": cfg.steps, "step_time_s": elapsed / cfg.steps, "tokens_per_s": tok_s,
        "flops_per_token": flops, "peak_flops": peak,
        "mfu": flops * tok_s / (peak * env.world_size) if peak else None,
        "peak_memory_bytes": peak_mem["bytes"], "peak_memory_kind": peak_mem["kind"], "last_loss": loss,
    }


def _peak_memory(rt: Runtime, env: dist.DistEnv) -> dict:
    """The largest rank's peak: CUDA's allocated memory in the timed steps, or the process's
    maximum resident set size elsewhere (all of its life, start-up included)."""
    if rt.device.type == "cuda":
        value, kind = torch.cuda.max_memory_allocated(rt.device), "cuda max allocated (timed steps)"
    else:
        # ru_maxrss is in KiB on Linux, bytes on macOS
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        value, kind = rss if sys.platform == "darwin" else rss * 1024, "process max resident set"
    t = torch.tensor([float(value)], device=rt.device if rt.device.type == "cuda" else "cpu")
    dist.all_reduce_max(t)
    return {"bytes": int(t.item()), "kind": kind}


def format_table(res: dict) -> str:
    def mib(n: int) -> str:
        return f"{n / 2**20:,.0f} MiB ({res['peak_memory_kind']})"

    rows = [
        ("model", f"{res['model']} ({res['params'] / 1e6:.1f}M parameters)"),
        ("device", f"{res['device']} x {res['ranks']} rank(s){' FSDP' if res['fsdp'] else ''}"),
        ("dtype / compiled", f"{res['dtype']} / {'yes' if res['compiled'] else 'no'}"),
        ("batch", f"{res['batch_size']} x {res['seq_len']} tokens per rank"),
        ("step time", f"{res['step_time_s'] * 1000:,.1f} ms (mean of {res['steps']})"),
        ("tokens/s", f"{res['tokens_per_s']:,.0f}"),
        ("MFU", f"{100 * res['mfu']:.1f}% of {res['peak_flops'] / 1e12:,.1f} TFLOP/s" if res["mfu"] is not None
         else "unknown (no peak for this device; give --peak-tflops)"),
        ("peak memory", mib(res["peak_memory_bytes"])),
    ]
    w = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{w}}  {v}" for k, v in rows)

