"""The memory plan (gptlab.plan) against measured peak memory of CPU training steps, at two sizes.

Each size runs in fresh processes: two full training steps (forward, backward, AdamW; one and
two micro-batches per step) of train.train_step, fp32, uncompiled (the fused head loss), as `gptlab train --device cpu` runs them.
Measured two ways:
  tensors  the peak of live tensor storage, by category, from torch's MemTracker (a dispatch mode
           that sees every allocation: parameters, gradients, optimizer state, activations, temporaries);
  rss      the peak resident set size of the process minus its size just before the model was built
           (includes the allocator's slack and anything torch allocates outside tensors).

    .venv/bin/python benchmarks/plan_memory.py
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

SIZES = [  # (name, n_layer, n_head, n_embd, seq_len, micro-batch)
    ("tiny (L4 C128 T128, B8)", 4, 4, 128, 128, 8),
    ("L8 C256 T256, B8", 8, 8, 256, 256, 8),
]
MIB = 1 << 20


def _vm(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(field)


def measure(n_layer: int, n_head: int, n_embd: int, seq_len: int, batch: int, accum: int, how: str) -> dict:
    import torch

    from gptlab.config import ModelConfig
    from gptlab.model import GPT
    from gptlab.optim import make_adamw
    from gptlab.parallel import Placed
    from gptlab.train import train_step
    from gptlab.runtime import get_runtime

    torch.manual_seed(0)
    rt = get_runtime("cpu", "fp32", False)
    cfg = ModelConfig(n_layer=n_layer, n_head=n_head, n_embd=n_embd, seq_len=seq_len)
    x = torch.randint(0, cfg.vocab_size, (batch, seq_len))
    torch.ones(4) @ torch.ones(4)  # load the kernels before the baseline
    base = _vm("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM, the peak RSS, to the current RSS

    def steps(tracker=None):
        model = GPT(cfg)
        opt = make_adamw(model, lr=1e-4, weight_decay=0.1, betas=(0.9, 0.95), eps=1e-8, device_type="cpu")
        placed = Placed(model=model, forward=model)
        for _ in range(2):  # the second step runs with the AdamW moments allocated
            # accumulation as train_step does it: the gradients of the first micro-batches are held
            # through the next one's forward (one call per micro-batch, for the tracker's sake)
            for micro in range(accum):
                train_step(placed, rt, [(x, x)], accum=1, optimizer=opt if micro == accum - 1 else None)
                if tracker is not None:
                    tracker.reset_mod_stats()  # its per-module statistics are per forward; the peak stays

    if how == "rss":
        steps()
        return {"rss": _vm("VmHWM") - base}
    from torch.distributed._tools.mem_tracker import MemTracker

    mt = MemTracker()
    with mt:
        steps(mt)
    snap = mt.get_tracker_snapshot("peak")
    (dev_snap,) = [v for k, v in snap.items() if str(k) == "cpu"]
    return {str(getattr(k, "value", k)): int(v) for k, v in dev_snap.items()}


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        args = [int(a) for a in sys.argv[2:8]]
        print(json.dumps(measure(*args, how=sys.argv[8])))
        return
    from gptlab.config import ModelConfig
    from gptlab.plan import MemoryPlan

    print("size, accumulation | plan: params grads optim activations total | measured tensors: peak "
          "(by category) | measured rss peak | plan/tensors")
    for (name, L, H, C, T, B), accum in [(size, a) for size in SIZES for a in (1, 2)]:
        got = {}
        for how in ("tensors", "rss"):
            # a fixed mmap threshold: freed tensors go back to the OS, so RSS follows live memory
            env = {**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "65536"}
            out = subprocess.run([sys.executable, __file__, "--child", str(L), str(H), str(C), str(T), str(B),
                                  str(accum), how], capture_output=True, text=True, env=env, check=True)
            got.update(json.loads(out.stdout.strip().splitlines()[-1]))
        plan = MemoryPlan(ModelConfig(n_layer=L, n_head=H, n_embd=C, seq_len=T), world_size=1, fsdp=False,
                          dtype="fp32", batch_size=B, compiled=False)
        act = got.get("Activation", 0) + got.get("Temp", 0)
        print(f"{name}, accum {accum} | {plan.parameters() / MIB:.1f} {plan.gradients() / MIB:.1f} {plan.optimizer() / MIB:.1f} "
              f"{plan.activations() / MIB:.1f} {plan.total() / MIB:.1f} MiB | "
              f"{got['Total'] / MIB:.1f} MiB (params {got.get('Parameter', 0) / MIB:.1f}, "
              f"grads {got.get('Gradient', 0) / MIB:.1f}, optim {got.get('Optstate', 0) / MIB:.1f}, "
              f"act+temp {act / MIB:.1f}) | {got['rss'] / MIB:.1f} MiB | {plan.total() / got['Total']:.3f}")


if __name__ == "__main__":
    main()
