"""Training tokens/s from a local dataset directory vs the same shards streamed from a throttled
loopback HTTP server (gptlab.data.stream: prefetch thread, bounded cache, delete after use).

Writes a dataset of many small train shards (random tokens), then trains the same tiny model
(fp32, CPU) from the directory and from the URL, alternating, `--repeat` times each. The server
is limited to `--rate` bytes/s; the report says how that compares with the bytes/s training
consumes (2 bytes per token), and, with `--slow-rate`, adds a URL run whose link is slower than
training (where streaming must stall). tokens/s = tokens trained / wall time of the steps after
the first (from metrics.jsonl). Prints a markdown section for benchmarks/RESULTS.md.

    .venv/bin/python benchmarks/stream.py [--steps 60] [--rate 200K] [--slow-rate 0] [--repeat 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "tests"))

from gptlab.config import EOT_TOKEN, resolve_train_config  # noqa: E402
from gptlab.data import shards as sh  # noqa: E402
from gptlab.units import parse_size  # noqa: E402
from gptlab.train import train  # noqa: E402
from shard_server import ShardServer  # noqa: E402


def write_dataset(d: Path, n_train: int, shard_tokens: int) -> None:
    d.mkdir(parents=True)
    rng = np.random.default_rng(0)
    entries = []
    for i in range(n_train + 1):
        split = "val" if i == 0 else "train"
        toks = rng.integers(0, 50257, shard_tokens).astype(np.uint16)
        name = sh.shard_name("bench", split, i)
        entries.append({"file": name, "split": split, "tokens": shard_tokens, "sha256": sh.write_shard(d / name, toks),
                        "documents": int((toks == EOT_TOKEN).sum())})
    sh.write_manifest(d, {"format": sh.FORMAT, "format_version": sh.FORMAT_VERSION,
                          "source": {"name": "random"}, "shards": entries})


def run(data: str, out: Path, cache: Path, args) -> float:
    cfg = resolve_train_config(dict(
        model="tiny", n_layer=args.n_layer, n_head=2, n_embd=args.n_embd, seq_len=args.seq_len, data=data,
        out=str(out), data_cache=str(cache), data_disk_budget=args.budget, batch_size=args.batch_size,
        total_batch_tokens=args.batch_size * args.seq_len, max_steps=args.steps, lr=1e-3, warmup_steps=2,
        eval_every=0, sample_tokens=0, checkpoint_every=0, device="cpu", seed=1))
    train(cfg)
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    times = [r["time"] for r in recs if r["kind"] == "train"]
    tokens = (len(times) - 1) * cfg.total_batch_tokens
    return tokens / (times[-1] - times[0])


def paced(data: str, cache: Path, args, step_s: float, steps: int) -> tuple[float, float]:
    """The loader alone, feeding a consumer that needs step_s seconds a batch (a stand-in for the
    model that CPU load cannot slow down): (tokens/s, seconds spent waiting for shards)."""
    from gptlab.data.loader import TrainLoader

    ld = TrainLoader(data, seq_len=args.seq_len, batch_size=args.batch_size, cache=cache, disk_budget=args.budget)
    ld.next_batch()
    t0 = time.perf_counter()
    for _ in range(steps):
        ld.next_batch()
        time.sleep(step_s)
    dt = time.perf_counter() - t0
    wait = ld.wait_seconds
    ld.close()
    return steps * args.batch_size * args.seq_len / dt, wait


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--n-layer", type=int, default=2)
    ap.add_argument("--n-embd", type=int, default=64)
    ap.add_argument("--shard-tokens", type=int, default=8192)
    ap.add_argument("--shards", type=int, default=24)
    ap.add_argument("--rate", default="200K", help="server bytes/s per response (K/M suffixes)")
    ap.add_argument("--slow-rate", default="0", help="also a run at this rate (0: none)")
    ap.add_argument("--budget", default="64K", help="--data-disk-budget of the streamed runs")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--paced-steps", type=int, default=300)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="gptlab-stream-bench-"))
    write_dataset(tmp / "www" / "ds", args.shards, args.shard_tokens)
    srv = ShardServer(tmp / "www")
    url = f"{srv.url}/ds"
    rate, slow = parse_size(args.rate), parse_size(args.slow_rate) if args.slow_rate != "0" else 0
    res: dict[str, list[float]] = {"local": [], "url": [], "slow": []}
    for i in range(args.repeat):
        res["local"].append(run(str(tmp / "www" / "ds"), tmp / f"local{i}", tmp / "cache", args))
        srv.rate = rate
        res["url"].append(run(url, tmp / f"url{i}", tmp / "cache", args))
        if slow:
            srv.rate = slow
            res["slow"].append(run(url, tmp / f"slow{i}", tmp / "cache", args))
        srv.rate = None
    med = {k: statistics.median(v) for k, v in res.items() if v}
    # paced: the consumer reads shard bytes at half the link's rate: the link is only 2x faster
    step_s = 2 * args.batch_size * args.seq_len / (rate / 2)
    n = args.paced_steps
    paced_res = {"local": paced(str(tmp / "www" / "ds"), tmp / "cache", args, step_s, n)}
    srv.rate = rate
    paced_res["url"] = paced(url, tmp / "cache", args, step_s, n)
    srv.stop()
    consume = 2 * med["local"]  # bytes/s of tokens training reads
    print(f"\n## Streaming shards vs a local directory (2-core CPU, shared, {time.strftime('%Y-%m-%d')})\n")
    print(f"`.venv/bin/python benchmarks/stream.py {' '.join(sys.argv[1:])}`: {args.n_layer} layers x "
          f"{args.n_embd}, T={args.seq_len}, batch {args.batch_size}, {args.steps} steps, fp32 CPU; "
          f"{args.shards} train shards of {args.shard_tokens:,} tokens; budget {args.budget}. "
          f"Training consumes about {consume / 1e3:.1f} KB/s of shard bytes.\n")
    print("| source | link | tok/s (median) | runs | vs local |\n|---|---|---:|---|---:|")
    links = {"local": "-", "url": f"{rate / 1e3:.0f} KB/s", "slow": f"{slow / 1e3:.0f} KB/s"}
    for k, v in med.items():
        print(f"| {k} | {links[k]} | {v:,.0f} | {', '.join(f'{x:,.0f}' for x in res[k])} | "
              f"{100 * v / med['local']:.1f}% |")
    print(f"\nPaced loader (no model: a consumer sleeping {1e3 * step_s:.1f} ms a batch, so it reads "
          f"{2 * args.batch_size * args.seq_len / step_s / 1e3:.1f} KB/s, half the link), {n} batches:\n")
    print("| source | link | tok/s | waited for shards (s) | vs local |\n|---|---|---:|---:|---:|")
    for k, (tps, wait) in paced_res.items():
        print(f"| {k} | {links[k]} | {tps:,.0f} | {wait:.3f} | {100 * tps / paced_res['local'][0]:.1f}% |")


if __name__ == "__main__":
    main()
