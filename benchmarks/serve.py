"""gptlab serve under load: 1, 8 and 32 concurrent clients against one at a time.

For each preset a model of that shape with random weights (throughput does not depend on the
weights) is saved and served by `gptlab serve` in a subprocess on 127.0.0.1. Each client sends
its requests one after another (non-streaming POST /v1/completions, distinct prompts, greedy,
max_tokens new tokens each). One client is "one at a time"; the others share the model through
dynamic batching. Prints generated tokens/s (all clients together), request latency p50/p99, and
the speed-up over one at a time.

    .venv/bin/python benchmarks/serve.py                    # tiny and gpt2, 1/8/32 clients
    .venv/bin/python benchmarks/serve.py --presets tiny --clients 1 32
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

from gptlab.checkpoint import save_model
from gptlab.config import PRESETS
from gptlab.model import GPT


def start_server(model_dir: Path, max_batch: int) -> tuple[subprocess.Popen, str, int]:
    proc = subprocess.Popen([sys.executable, "-m", "gptlab", "serve", str(model_dir), "--port", "0", "--device",
                             "cpu", "--max-batch", str(max_batch)], stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    while True:
        line = proc.stderr.readline()
        if not line:
            raise SystemExit(f"gptlab serve exited early ({proc.wait()})")
        m = re.search(r"on http://([\d.]+):(\d+)", line)
        if m:
            # keep draining stderr so that the server never blocks on a full pipe
            threading.Thread(target=proc.stderr.read, daemon=True).start()
            return proc, m.group(1), int(m.group(2))


def one_request(host: str, port: int, prompt: str, max_tokens: int) -> tuple[float, int]:
    """(seconds, completion tokens) of one non-streaming completion."""
    body = json.dumps({"prompt": prompt, "max_tokens": max_tokens, "temperature": 0})
    conn = http.client.HTTPConnection(host, port, timeout=600)
    t0 = time.perf_counter()
    conn.request("POST", "/v1/completions", body=body, headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    data = json.loads(resp.read())
    secs = time.perf_counter() - t0
    conn.close()
    if resp.status != 200:
        raise SystemExit(f"request failed: {resp.status} {data}")
    return secs, data["usage"]["completion_tokens"]


def load(host: str, port: int, clients: int, per_client: int, max_tokens: int, tag: str) -> dict:
    """`clients` threads, each sending `per_client` requests in turn; returns the measurements."""
    latencies: list[float] = []
    tokens = [0]
    lock = threading.Lock()

    def client(c: int) -> None:
        for r in range(per_client):
            secs, n = one_request(host, port, f"{tag} client {c}, request {r}: Once upon a time, there", max_tokens)
            with lock:
                latencies.append(secs)
                tokens[0] += n

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    lat = sorted(latencies)
    p99 = lat[min(len(lat) - 1, round(0.99 * (len(lat) - 1)))]
    return {"clients": clients, "requests": len(lat), "tokens": tokens[0], "seconds": wall,
            "tokens_per_s": tokens[0] / wall, "p50": statistics.median(lat), "p99": p99}


def bench_preset(preset: str, clients: list[int], max_tokens: int, requests: int, tmp: Path) -> list[dict]:
    torch.manual_seed(0)
    model_dir = save_model(GPT(PRESETS[preset]), tmp / preset)
    proc, host, port = start_server(model_dir, max_batch=max(clients))
    try:
        one_request(host, port, "warm-up", 4)
        rows = []
        for c in clients:
            per_client = requests if c == 1 else max(2, -(-requests // c))
            rows.append(load(host, port, c, per_client, max_tokens, f"{preset}-{c}"))
            r = rows[-1]
            print(f"  {preset:5s} {c:3d} clients: {r['requests']:3d} requests, {r['tokens']:5d} tokens in "
                  f"{r['seconds']:6.1f}s = {r['tokens_per_s']:7.1f} tokens/s; latency p50 {r['p50']:.2f}s "
                  f"p99 {r['p99']:.2f}s", flush=True)
        return rows
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--presets", nargs="+", default=["tiny", "gpt2"], choices=list(PRESETS))
    ap.add_argument("--clients", nargs="+", type=int, default=[1, 8, 32])
    ap.add_argument("--max-tokens", type=int, default=None, help="new tokens per request (default: tiny 64, others 16)")
    ap.add_argument("--requests", type=int, default=None,
                    help="requests per level, at least 2 per client when concurrent (default: tiny 64, others 16)")
    args = ap.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; random weights (speed does not "
          f"depend on them); greedy, non-streaming")
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for preset in args.presets:
            mt = args.max_tokens or (64 if preset == "tiny" else 32)
            rq = args.requests or (64 if preset == "tiny" else 16)
            print(f"{preset}: {mt} new tokens per request", flush=True)
            results[preset] = bench_preset(preset, args.clients, mt, rq, Path(tmp))
    print("\n| preset | clients | requests | tokens/s | vs one at a time | p50 latency | p99 latency |")
    print("|---|---|---|---|---|---|---|")
    for preset, rows in results.items():
        base = next((r["tokens_per_s"] for r in rows if r["clients"] == 1), None)
        for r in rows:
            ratio = f"{r['tokens_per_s'] / base:.1f}x" if base else "-"
            print(f"| {preset} | {r['clients']} | {r['requests']} | {r['tokens_per_s']:.1f} | {ratio} | "
                  f"{r['p50']:.2f} s | {r['p99']:.2f} s |")


if __name__ == "__main__":
    main()
