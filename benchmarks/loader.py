"""How much faster the loader serves batches than the `tiny` model consumes them.

Times TrainLoader.next_batch at (8, 128) over a prepared dataset against a forward + backward of
model.GPT with the `tiny` preset on one such batch (fp32, CPU). Prints a markdown section for
benchmarks/RESULTS.md.

    .venv/bin/python benchmarks/loader.py [--data DIR]   (default: prepares shakespeare into a temp dir)
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=None)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=128)
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


if __name__ == "__main__":
    main()
