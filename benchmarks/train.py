"""Training throughput: gptlab against transformers' GPT2LMHeadModel in a plain PyTorch loop.

Both train the same GPT-2 shape on the same batches with the same AdamW settings, on the same
device, side by side in one run (alternating rounds, so a busy machine slows both alike). Reports
tokens/s and MFU against this machine's measured fp32 matmul rate (CPU) or the GPU's peak.

    .venv/bin/python benchmarks/train.py                       # tiny preset, CPU
    .venv/bin/python benchmarks/train.py --model gpt2 --batch-size 4 --seq-len 256 --steps 3
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time

import torch


def matmul_flops(device: torch.device, n: int = 2048, reps: int = 10) -> float:
    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
    for _ in range(3):
        a @ b
    sync(device)
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync(device)
    return 2 * n**3 * reps / (time.perf_counter() - t)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def make_step(model, opt, rt, loss_of):
    """One optimizer step of the plain loop both runners share: forward, backward, clip 1.0, AdamW."""

    def step(x, y):
        with rt.autocast():
            loss = loss_of(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    return step


def build_gptlab(cfg, args, rt):
    """gptlab's own step, exactly as the trainer runs it (train.train_step on a placed model)."""
    from gptlab.dist import DistEnv
    from gptlab.model import GPT
    from gptlab.optim import make_adamw
    from gptlab.parallel import place
    from gptlab.train import train_step

    torch.manual_seed(0)
    placed = place(GPT(cfg), rt, DistEnv())
    opt = make_adamw(placed.model, lr=6e-4, weight_decay=0.1, betas=(0.9, 0.95), eps=1e-8,
                     device_type=rt.device.type)
    return lambda x, y: train_step(placed, rt, [(x, y)], accum=1, optimizer=opt, grad_clip=1.0)


def build_hf(cfg, args, rt):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    hf_cfg = GPT2Config(n_layer=cfg.n_layer, n_head=cfg.n_head, n_embd=cfg.n_embd, n_positions=cfg.seq_len,
                        vocab_size=cfg.vocab_size, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                        attn_implementation="sdpa")
    model = GPT2LMHeadModel(hf_cfg).to(rt.device)
    model.train()
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    fused = {"fused": True} if rt.device.type == "cuda" else {}
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=6e-4, betas=(0.9, 0.95), eps=1e-8, **fused)
    fwd = torch.compile(model) if rt.compile else model
    # transformers shifts the labels itself
    return make_step(model, opt, rt, lambda x, y: fwd(input_ids=x, labels=x).loss)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=None)
    p.add_argument("--steps", type=int, default=5, help="timed steps per round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default="auto")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--json", action="store_true")
    args = p.parse_args()

    from gptlab.config import model_preset
    from gptlab.runtime import get_runtime

    rt = get_runtime(args.device, args.dtype, args.compile)
    cfg = model_preset(args.model, seq_len=args.seq_len)
    T, B = cfg.seq_len, args.batch_size
    g = torch.Generator().manual_seed(0)
    # gptlab's loader yields x and y = x shifted by one; transformers shifts labels itself, so it
    # sees T tokens and scores T-1 of them: both do the same work per step.
    data = torch.randint(0, cfg.vocab_size, (8, B, T + 1), generator=g).to(rt.device)
    peak = rt.peak_flops() or (matmul_flops(rt.device) if rt.device.type == "cpu" else None)
    flops_per_token = cfg.flops_per_token(T)

    runners = {"gptlab": build_gptlab(cfg, args, rt), "transformers": build_hf(cfg, args, rt)}
    for name, step in runners.items():
        for i in range(args.warmup):
            d = data[i % len(data)]
            step(d[:, :-1], d[:, 1:]) if name == "gptlab" else step(d[:, :-1], None)
        sync(rt.device)
    rates: dict[str, list[float]] = {k: [] for k in runners}
    for r in range(args.rounds):
        for name, step in runners.items():
            t = time.perf_counter()
            for i in range(args.steps):
                d = data[i % len(data)]
                step(d[:, :-1], d[:, 1:]) if name == "gptlab" else step(d[:, :-1], None)
            sync(rt.device)
            rates[name].append(args.steps * B * T / (time.perf_counter() - t))
    out = {
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "threads": torch.get_num_threads(),
        "runtime": rt.describe(),
        "model": args.model, "params": cfg.num_params(), "batch": B, "seq_len": T,
        "peak_flops": peak,
    }
    for name, rs in rates.items():
        med = statistics.median(rs)
        out[name] = {"tok_per_s": med, "rounds": rs, "mfu": (flops_per_token * med / peak) if peak else None}
    out["speedup"] = out["gptlab"]["tok_per_s"] / out["transformers"]["tok_per_s"]
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        print(f"{rt.describe()}; {args.model} ({cfg.num_params() / 1e6:.1f}M params), batch {B} x {T}, "
              f"{torch.get_num_threads()} threads; peak {peak / 1e9 if peak else float('nan'):.1f} GFLOP/s"
              f"{' (measured fp32 2048x2048 matmul)' if rt.device.type == 'cpu' else ''}")
        for name in runners:
            r = out[name]
            mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a"
            print(f"  {name:13s} {r['tok_per_s']:10,.0f} tok/s   MFU {mfu}   rounds {[round(x) for x in r['rounds']]}")
        print(f"  gptlab / transformers: {out['speedup']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
