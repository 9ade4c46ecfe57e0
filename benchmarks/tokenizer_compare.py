"""GPT-2's tokenizer against a Shakespeare-trained BPE and a byte-level one, for the same wall-clock
budget: the `tiny` shape on the embedded Shakespeare, compared by val bits per byte.

For each tokenizer: train it (timed; GPT-2's is given), prepare the corpus with it, measure the
seconds per step in a short calibration run, then train for as many steps as fit the budget (a
full schedule: warm-up and cosine decay), score the whole val split with `gptlab eval` (bits per
byte, the same val text for all three), and draw one sample. Prints a Markdown table.

    .venv/bin/python benchmarks/tokenizer_compare.py --budget 120 --vocab-size 4096
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path


def gptlab(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    r = subprocess.run([sys.executable, "-m", "gptlab", *map(str, args)], capture_output=True, text=True,
                       env={**os.environ, "PYTHONUNBUFFERED": "1"})
    if check and r.returncode != 0:
        sys.exit(f"gptlab {' '.join(map(str, args))} failed:\n{r.stderr[-3000:]}")
    return r


def metrics(run: Path, kind: str) -> list[dict]:
    recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [r for r in recs if r.get("kind") == kind]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--budget", type=float, default=120.0, help="training seconds per tokenizer")
    ap.add_argument("--vocab-size", type=int, default=4096, help="the trained BPE's size (bytes + merges)")
    ap.add_argument("--work", default="runs/tokbench", help="scratch directory (replaced pieces only)")
    ap.add_argument("--batch-tokens", type=int, default=1024)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--calibrate-steps", type=int, default=12)
    ap.add_argument("--prompt", default="Hor.\n")
    args = ap.parse_args()

    from gptlab.data.sources import shakespeare_source
    from gptlab.tokenizer import load_tokenizer
    from gptlab.tokenizer_train import train_tokenizer

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    docs = list(shakespeare_source().documents(0))
    corpus_bytes = sum(len(d.encode()) for d in docs)

    tokenizers: dict[str, dict] = {"gpt2": {"dir": "gpt2", "train_s": None}}
    for name, n in ((f"bpe{args.vocab_size}", args.vocab_size), ("bytes", 256)):
        t0 = time.perf_counter()
        train_tokenizer(shakespeare_source(), work / "tok" / name, n, progress=False)
        tokenizers[name] = {"dir": str(work / "tok" / name), "train_s": time.perf_counter() - t0}

    rows = []
    for name, t in tokenizers.items():
        tok = load_tokenizer(None if t["dir"] == "gpt2" else t["dir"])
        n_tokens = sum(len(x) for x in tok.encode_batch(docs, num_threads=2))
        data = work / "data" / name
        gptlab("prepare", "shakespeare", "--out", data, "--tokenizer", t["dir"], "--no-progress")
        common = ["--model", "tiny", "--data", data, "--total-batch-tokens", args.batch_tokens,
                  "--batch-size", args.batch_size, "--sample-tokens", "0", "--device", "cpu"]
        # seconds per step, from a short run (its first step, compile-free but cold, left out)
        cal = work / "runs" / f"{name}-cal"
        gptlab("train", *common, "--max-steps", args.calibrate_steps, "--eval-every", "0", "--checkpoint-every", "0",
               "--out", cal, "--warmup-steps", "1", "--resume", "auto")
        tr = metrics(cal, "train")[1:]
        step_s = sum(args.batch_tokens / r["tok_per_s"] for r in tr) / len(tr)
        steps = max(10, int(args.budget / step_s))
        run = work / "runs" / name
        t0 = time.perf_counter()
        gptlab("train", *common, "--max-steps", steps, "--warmup-steps", max(1, steps // 10),
               "--eval-every", 0, "--checkpoint-every", 0, "--out", run, "--resume", "auto")
        wall = time.perf_counter() - t0
        tr = metrics(run, "train")
        tok_s = sum(r["tok_per_s"] for r in tr[1:]) / max(1, len(tr) - 1)
        ev = json.loads(gptlab("eval", run, "--val", data, "--json", "--device", "cpu").stdout)["val"]
        (work / "prompt.txt").write_text(args.prompt)
        sample = json.loads(gptlab("sample", run, "--prompt-file", work / "prompt.txt", "--max-new-tokens", 200,
                                   "--temperature", "0.8", "--seed", "7", "--json", "--device", "cpu").stdout)
        text = sample["samples"][0]["text"]
        rows.append({"tokenizer": name, "vocab": tok.vocab_size, "train_s": t["train_s"],
                     "bytes_per_token": corpus_bytes / n_tokens, "steps": steps, "wall_s": wall,
                     "tok_per_s": tok_s, "bytes_per_s": tok_s * corpus_bytes / n_tokens,
                     "val_loss": ev["loss"], "bpb": ev["bits_per_byte"], "val_bytes": ev["bytes"],
                     "sample": (args.prompt + text)[:300]})
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)

    print("| tokenizer | ids | tokenizer training | bytes/token | steps | train wall | tokens/s | bytes/s "
          "| val loss/token | val bits/byte |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        train_s = "given" if r["train_s"] is None else f"{r['train_s']:.1f} s"
        print(f"| {r['tokenizer']} | {r['vocab']:,} | {train_s} | {r['bytes_per_token']:.2f} | {r['steps']} "
              f"| {r['wall_s']:.0f} s | {r['tok_per_s']:,.0f} | {r['bytes_per_s']:,.0f} | {r['val_loss']:.3f} "
              f"| {r['bpb']:.3f} |")
    print(f"\n(val: the whole val split, {rows[0]['val_bytes']:,} bytes of text for every tokenizer)")
    for r in rows:
        print(f"\n{r['tokenizer']}:\n```\n{r['sample']}\n```")


if __name__ == "__main__":
    main()
