"""`gptlab prepare files` against a plain single-process tiktoken loop over the same documents.

Both run end to end as fresh processes (start-up, imports, building the GPT-2 encoding, reading
the parquet files), alternating A, B, A, B so that a burst of load from other processes disturbs
both alike. The plain loop is the usual baseline: for each document, `encode_ordinary` plus the
end-of-text token, counted (it writes nothing). Prints a markdown section for benchmarks/RESULTS.md.

    .venv/bin/python benchmarks/prepare.py [--corpus '../shared/data/fineweb-legal/*.parquet'] [--repeat 3]
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

PLAIN = r"""
import sys, json
import pyarrow.parquet as pq
from gptlab.tokenizer import get_encoding
enc = get_encoding()
files = sys.argv[1:]
docs = tokens = 0
for path in files:
    if path.endswith(".parquet"):
        pf = pq.ParquetFile(path)
        texts = (t for g in range(pf.num_row_groups) for t in pf.read_row_group(g, columns=["text"]).column(0).to_pylist())
    else:
        texts = (json.loads(line)["text"] for line in open(path, encoding="utf-8") if line.strip())
    for text in texts:
        ids = [50256] + enc.encode_ordinary(text)
        docs += 1
        tokens += len(ids)
print(json.dumps({"docs": docs, "tokens": tokens}))
"""


def machine_busy_s() -> float:
    """CPU seconds all processes on this machine have used (from /proc/stat; 0 where unavailable)."""
    try:
        fields = open("/proc/stat").readline().split()[1:]
    except OSError:
        return 0.0
    user, nice, system, idle, iowait, irq, softirq, steal = (int(x) for x in fields[:8])
    return (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")


def own_children_s() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)  # our runs, and their worker processes
    return r.ru_utime + r.ru_stime


OTHERS = []  # per run: the share of the machine's cores that other processes used meanwhile


def timed(cmd: list[str], env: dict) -> tuple[float, str]:
    busy, own = machine_busy_s(), own_children_s()
    t = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    dt = time.perf_counter() - t
    others = (machine_busy_s() - busy) - (own_children_s() - own)
    OTHERS.append(max(0.0, others) / (dt * (os.cpu_count() or 1)))
    if r.returncode != 0:
        sys.exit(f"failed: {' '.join(cmd[:6])} ...\n{r.stderr}")
    return dt, r.stdout


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", default=str(ROOT.parent / "shared/data/fineweb-legal/*.parquet"))
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--workers", type=int, default=None)
    args = ap.parse_args()
    files = sorted(glob.glob(args.corpus))
    if not files:
        sys.exit(f"no files match {args.corpus}")
    size = sum(os.path.getsize(f) for f in files)
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""))
    tmp = Path(tempfile.mkdtemp(prefix="gptlab-bench-"))
    ours_t, plain_t = [], []
    try:
        for i in range(args.repeat):
            out = tmp / f"ours{i}"
            cmd = [sys.executable, "-m", "gptlab", "prepare", "files", *files, "--out", str(out), "--no-progress"]
            if args.workers:
                cmd += ["--workers", str(args.workers)]
            dt, _ = timed(cmd, env)
            ours_t.append(dt)
            manifest = json.loads((out / "manifest.json").read_text())
            dt, stdout = timed([sys.executable, "-c", PLAIN, *files], env)
            plain_t.append(dt)
            plain = json.loads(stdout)
            shutil.rmtree(out)
            assert manifest["tokens"] == plain["tokens"] and manifest["documents"] == plain["docs"], (manifest["tokens"], plain)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    med_o, med_p = statistics.median(ours_t), statistics.median(plain_t)
    tokens, docs = plain["tokens"], plain["docs"]
    print("### prepare: `gptlab prepare files` vs a plain tiktoken loop\n")
    print(f"- corpus: {len(files)} parquet/jsonl files, {size / 1e6:.1f} MB, {docs:,} documents, {tokens:,} tokens "
          f"(both count the same tokens, EOT included)")
    print(f"- runs: {args.repeat} alternating pairs, each a fresh process end to end (start-up, encoding build, reading, "
          f"tokenizing; ours also writes and hashes shards)")
    print(f"- other processes' use of the {os.cpu_count()} cores during each run (ours, plain, ours, ...): "
          f"{', '.join(f'{x:.0%}' for x in OTHERS)} (0% = the machine was ours)\n")
    print("| | median s | min s | tokens/s (median) |")
    print("|---|---|---|---|")
    print(f"| plain single-process tiktoken loop | {med_p:.2f} | {min(plain_t):.2f} | {tokens / med_p / 1e6:.2f}M |")
    print(f"| gptlab prepare files | {med_o:.2f} | {min(ours_t):.2f} | {tokens / med_o / 1e6:.2f}M |")
    print(f"\nspeed-up (plain / ours): median {med_p / med_o:.2f}x, best-of {min(plain_t) / min(ours_t):.2f}x")
    print(f"all runs (s): ours {[round(t, 2) for t in ours_t]}, plain {[round(t, 2) for t in plain_t]}")


if __name__ == "__main__":
    main()
