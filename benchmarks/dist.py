"""Overhead of data-parallel training on CPU: 1 process against 2 gloo ranks (torchrun), same
model, same global batch, same data, side by side in one run. On a 2-core machine each rank gets
one core, so this measures what DDP's all-reduce and process split cost, not a speed-up.

    .venv/bin/python benchmarks/dist.py [--data DIR] [--steps 8]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np


def make_data(d: Path) -> None:
    rng = np.random.default_rng(0)
    for name, n in (("bench_val_000000.bin", 50_000), ("bench_train_000001.bin", 1_000_000)):
        header = np.zeros(256, dtype="<i4")
        header[:3] = (20240520, 1, n)
        with open(d / name, "wb") as f:
            f.write(header.tobytes())
            f.write(rng.integers(0, 50257, n).astype("<u2").tobytes())


def run(cmd: list[str], out: Path, threads: int) -> list[float]:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    r = subprocess.run(cmd + ["--out", str(out)], capture_output=True, text=True, env=env)
    if r.returncode != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{r.stderr[-2000:]}")
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["tok_per_s"] for r in recs if r["kind"] == "train"][2:]  # skip warm-up steps


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=None, help="a prepared dataset (default: random tokens)")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--rounds", type=int, default=2)
    args = p.parse_args()
    cores = os.cpu_count() or 2
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = args.data
        if data is None:
            data = tmp / "data"
            data.mkdir()
            make_data(data)
        train = ["-m", "gptlab", "train", "--model", "tiny", "--data", str(data), "--max-steps", str(args.steps),
                 "--batch-size", "8", "--total-batch-tokens", "4096", "--eval-every", "0", "--sample-tokens", "0",
                 "--checkpoint-every", "0", "--device", "cpu"]
        one, two = [], []
        for r in range(args.rounds):
            one += run([sys.executable, *train], tmp / f"one{r}", threads=cores)
            two += run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        *train], tmp / f"two{r}", threads=max(1, cores // 2))
    a, b = statistics.median(one), statistics.median(two)
    print(f"tiny preset, 4096 tokens/step, {cores} cores, {args.steps} steps x {args.rounds} rounds (first 2 steps skipped)")
    print(f"  1 process, {cores} threads:            {a:8,.0f} tok/s")
    print(f"  2 gloo ranks, {max(1, cores // 2)} thread(s) each:    {b:8,.0f} tok/s")
    print(f"  2 ranks / 1 process:                {b / a:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
