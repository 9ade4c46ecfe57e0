"""How much faster the loader serves batches than the `tiny` model consumes them.

Times TrainLoader.next_batch at (8, 128) over a prepared dataset against a forward + backward of
model.GPT with the `tiny` preset on one such batch (fp32, CPU). Prints a markdown section for
benchmarks/RESULTS.md. Then runs --steps training steps of that model twice, in one run, alternating
step by step: batches cut on the main thread (no prefetch) and by TrainLoader.prefetch's background
thread, and prints per step the time the step waited for its batch (next_batch) side by side.

    .venv/bin/python benchmarks/loader.py [--data DIR] [--steps N] [--accum A]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))


def per_call(fn, n: int, repeats: int = 5) -> float:
    """Median over repeats of the mean seconds per call."""
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        for _ in range(n):
            fn()
        times.append((time.perf_counter() - t) / n)
    return statistics.median(times)


def wait_per_step(data, model, B: int, T: int, accum: int, steps: int) -> tuple[list[float], list[float]]:
    """Seconds each training step spent in next_batch: (main thread, background thread), the two
    loaders stepped in turn so that both see the same machine load."""
    from gptlab.data.loader import TrainLoader

    loaders = [TrainLoader(data, seq_len=T, batch_size=B, grad_accum=accum) for _ in range(2)]
    loaders[1].prefetch(pin_memory=False)  # a CPU: nothing to pin
    waits: tuple[list[float], list[float]] = ([], [])
    try:
        for _ in range(steps):
            for ld, out in zip(loaders, waits):
                waited = 0.0
                for _ in range(accum):
                    t = time.perf_counter()
                    x, y = ld.next_batch()
                    waited += time.perf_counter() - t
                    _, loss = model(x, y)
                    (loss / accum).backward()
                model.zero_grad(set_to_none=True)
                out.append(waited)
    finally:
        loaders[1].close()
    return waits


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=None)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--accum", type=int, default=2)
    args = ap.parse_args()

    import torch

    from gptlab.config import PRESETS
    from gptlab.data.loader import TrainLoader
    from gptlab.model import GPT

    tmp = None
    data = args.data
    if data is None:
        from gptlab.data.prepare import prepare
        from gptlab.data.sources import open_source

        tmp = tempfile.mkdtemp(prefix="gptlab-loader-")
        data = os.path.join(tmp, "shakespeare")
        prepare(open_source("shakespeare"), data, progress=False)
    try:
        B, T = args.batch_size, args.seq_len
        loader = TrainLoader(data, seq_len=T, batch_size=B)
        loader_s = per_call(loader.next_batch, 2000)

        torch.manual_seed(0)
        cfg = PRESETS["tiny"]
        model = GPT(cfg)
        x, y = loader.next_batch()

        def step() -> None:
            _, loss = model(x, y)
            loss.backward()
            model.zero_grad(set_to_none=True)

        for _ in range(3):
            step()
        model_s = per_call(step, 10, repeats=3)
        waits = wait_per_step(data, model, B, T, args.accum, args.steps)
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)

    print("### loader: batches served vs consumed by the `tiny` model\n")
    print(f"- dataset: {data if args.data else 'shakespeare (prepared in a temp dir)'}, "
          f"{loader.windows_per_epoch:,} windows of {T + 1} tokens")
    print(f"- torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores\n")
    print("| | ms per (8, 128) batch |")
    print("|---|---|")
    print(f"| TrainLoader.next_batch | {loader_s * 1e3:.3f} |")
    print(f"| tiny GPT forward + backward (fp32) | {model_s * 1e3:.1f} |")
    print(f"\nthe loader is {model_s / loader_s:,.0f}x faster than the model consumes batches (target >= 100x)")
    print(f"\n#### time a step waited for its batches ({args.accum} micro-batches a step), ms\n")
    print("| step | main thread (no prefetch) | background thread (prefetch) |")
    print("|---|---|---|")
    for i, (a, b) in enumerate(zip(*waits), 1):
        print(f"| {i} | {a * 1e3:.3f} | {b * 1e3:.3f} |")
    print(f"| median | {statistics.median(waits[0]) * 1e3:.3f} | {statistics.median(waits[1]) * 1e3:.3f} |")


if __name__ == "__main__":
    main()
