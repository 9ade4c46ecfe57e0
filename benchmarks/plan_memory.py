"""The memory plan (gptlab.plan) against the measured peak of live tensors of CPU training steps: one
process, and 2 gloo ranks under DDP and under FSDP, each with and without gradient accumulation.

Each row runs in fresh processes (torchrun for 2 ranks): three optimizer steps (forward, backward,
AdamW; the third runs after DDP's bucket rebuild and with the AdamW moments allocated) of
train.train_step, fp32, uncompiled (the fused head loss), placed as `gptlab train --device cpu` places
the model (train.place_for_training; parallel.place with FSDP). Measured with torch's MemTracker, a
dispatch mode that sees every tensor allocation (parameters, gradients, DDP's buckets, optimizer state,
activations, temporaries) on rank 0; its module statistics are reset before each micro-batch (it
refuses a module run twice otherwise), the peak is kept.

    .venv/bin/python benchmarks/plan_memory.py            # the table
    .venv/bin/python benchmarks/plan_memory.py --quick    # the micro size only

The child (`--child JSON`) prints one JSON line {"peak": bytes, "plan": bytes, ...}; tests/test_plan.py
runs it the same way.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

SIZES = [  # (name, n_layer, n_head, n_embd, seq_len, micro-batch)
    ("L2 C64 T64, B4", 2, 2, 64, 64, 4),
    ("tiny (L4 C128 T128), B8", 4, 4, 128, 128, 8),
    ("L8 C256 T256, B8", 8, 8, 256, 256, 8),
]
MIB = 1 << 20
STEPS = 3


def measure(mode: str, n_layer: int, n_head: int, n_embd: int, seq_len: int, batch: int, accum: int) -> dict:
    """Peak live tensor bytes on this rank over STEPS training steps, and the plan's total."""
    import torch
    from torch.distributed._tools.mem_tracker import MemTracker

    import gptlab.train as train
    from gptlab import dist
    from gptlab.config import ModelConfig
    from gptlab.model import GPT
    from gptlab.optim import make_adamw
    from gptlab.parallel import place
    from gptlab.plan import MemoryPlan
    from gptlab.runtime import get_runtime

    torch.manual_seed(0)
    rt = get_runtime("cpu", "fp32", False)
    env = dist.init("cpu")
    cfg = ModelConfig(n_layer=n_layer, n_head=n_head, n_embd=n_embd, seq_len=seq_len)
    x = torch.randint(0, cfg.vocab_size, (batch, seq_len))
    mt = MemTracker()
    micro_batch = train._micro_batch

    def tracked_micro_batch(*args, **kwargs):
        mt.reset_mod_stats()
        return micro_batch(*args, **kwargs)

    train._micro_batch = tracked_micro_batch
    try:
        with mt:
            model = GPT(cfg)
            placed = place(model, rt, env, fsdp=True) if mode == "fsdp" else train.place_for_training(model, rt, env)
            opt = make_adamw(model, lr=1e-4, weight_decay=0.1, betas=(0.9, 0.95), eps=1e-8, device_type="cpu")
            for _ in range(STEPS):
                train.train_step(placed, rt, [(x, x)] * accum, accum=accum, optimizer=opt)
    finally:
        train._micro_batch = micro_batch
        dist.shutdown()
    (snap,) = [v for k, v in mt.get_tracker_snapshot("peak").items() if str(k) == "cpu"]
    plan = MemoryPlan(cfg, world_size=env.world_size, fsdp=mode == "fsdp", dtype="fp32", batch_size=batch,
                      compiled=False, accum=accum)
    by_kind = {str(getattr(k, "value", k)): int(v) for k, v in snap.items()}
    return {"mode": mode, "rank": env.rank, "world_size": env.world_size, "accum": accum,
            "peak": by_kind.pop("Total"), "by_kind": by_kind, "plan": plan.total()}


def child_command(mode: str, size: tuple, accum: int) -> list[str]:
    """The command that measures one row: torchrun with 2 ranks for ddp and fsdp, else one process."""
    spec = json.dumps({"mode": mode, "size": list(size), "accum": accum})
    if mode == "one":
        return [sys.executable, __file__, "--child", spec]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", __file__,
            "--child", spec]


def run_row(mode: str, size: tuple, accum: int, timeout: float = 600) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run(child_command(mode, size, accum), capture_output=True, text=True, env=env,
                         timeout=timeout)
    if out.returncode != 0:
        raise RuntimeError(f"{mode} accum {accum}: exit {out.returncode}\n{out.stderr[-3000:]}")
    rows = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    return rows[-1]


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        spec = json.loads(sys.argv[2])
        res = measure(spec["mode"], *spec["size"], accum=spec["accum"])
        if res["rank"] == 0:  # one line: two ranks' prints can interleave
            print(json.dumps(res), flush=True)
        return
    sizes = SIZES[:1] if "--quick" in sys.argv else SIZES
    print(f"load average before: {os.getloadavg()[0]:.2f}")
    print("| size | placement | accumulation | plan total | measured peak (rank 0) | plan / measured |")
    print("|---|---|---|---|---|---|")
    for name, *size in sizes:
        for mode in ("one", "ddp", "fsdp"):
            for accum in (1, 2):
                r = run_row(mode, tuple(size), accum)
                label = {"one": "1 process", "ddp": "DDP, 2 ranks", "fsdp": "FSDP, 2 ranks"}[mode]
                print(f"| {name} | {label} | {accum} | {r['plan'] / MIB:.1f} MiB | {r['peak'] / MIB:.1f} MiB | "
                      f"{r['plan'] / r['peak']:.3f} |", flush=True)
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
