"""Training step time: gptlab against nanoGPT's own bench.py, side by side on this machine.

nanoGPT's published `bench.py` runs from its checkout (../shared/peers/nanogpt by default; it is
read, never copied): the launcher below only makes `torch.cuda.synchronize` a no-op (a CPU-only
torch has none) and passes bench.py's own configurator overrides as argv. bench.py hard-codes the
GPT-2 shape (12 layers x 768, 12 heads) in its GPTConfig(...) call, so for the `tiny` shape the
launcher wraps nanoGPT's GPTConfig to set n_layer, n_head and n_embd; nothing else changes.
`gptlab bench` runs the trainer's own step (AdamW, clipping at 1.0, the fused head).

Both: fp32, uncompiled, random tokens, B=4 sequences of T=128, bias on, vocabulary 50304 (gptlab:
GPT-2's 50257 padded to 50304), 10 warm-up then 20 timed steps, the same thread count. The runs
alternate (nanoGPT, gptlab, then gptlab, nanoGPT, ...), each in a fresh process, so a busy machine
slows both alike; each row carries the 1-minute load average before it.

    python benchmarks/peers.py                          # both shapes, 3 repeats, a table
    python benchmarks/peers.py --shape tiny --repeats 5 --json
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_NANOGPT = ROOT.parent / "shared" / "peers" / "nanogpt"
# (n_layer, n_head, n_embd): gptlab's presets of the same names
SHAPES = {"gpt2": (12, 12, 768), "tiny": (4, 4, 128)}
WARMUP, STEPS = 10, 20  # what nanoGPT's bench.py always runs; gptlab bench is given the same

# Runs bench.py as it is; the CUDA synchronize is stubbed, and nanoGPT's GPTConfig shape is set
# where bench.py's hard-coded one differs. argv (bench.py's --key=value overrides) is left alone.
LAUNCHER = """
import runpy, sys, torch
torch.cuda.synchronize = lambda *args, **kwargs: None
sys.path.insert(0, ".")
SHAPE = {shape!r}
if SHAPE:
    import model
    _GPTConfig = model.GPTConfig
    model.GPTConfig = lambda **kw: _GPTConfig(**{{**kw, **SHAPE}})
sys.argv[0] = "bench.py"
runpy.run_path("bench.py", run_name="__main__")
"""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", choices=("gpt2", "tiny", "both"), default="both")
    p.add_argument("--repeats", type=int, default=3, help="runs of each, alternating (default: 3)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--nanogpt", type=Path, default=DEFAULT_NANOGPT, help="nanoGPT checkout holding bench.py")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    args = p.parse_args(argv)
    if args.repeats < 1 or args.batch_size < 1 or args.seq_len < 1:
        p.exit(2, "peers.py: --repeats, --batch-size and --seq-len must be positive\n")
    if not (args.nanogpt / "bench.py").is_file():
        p.exit(2, f"peers.py: no bench.py in {args.nanogpt} (give --nanogpt DIR, a nanoGPT checkout)\n")
    return args


def _env(threads: int) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    src = str(ROOT / "src")  # this checkout's gptlab
    env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def _run(cmd: list[str], cwd: Path, threads: int) -> str:
    r = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env=_env(threads))
    if r.returncode != 0:
        sys.exit(f"peers.py: failed ({r.returncode}): {' '.join(cmd[:4])} ...\n{r.stderr[-3000:]}")
    return r.stdout


def nanogpt_cmd(args: argparse.Namespace, shape: str) -> list[str]:
    n_layer, n_head, n_embd = SHAPES[shape]
    override = {} if shape == "gpt2" else {"n_layer": n_layer, "n_head": n_head, "n_embd": n_embd}
    return [sys.executable, "-c", LAUNCHER.format(shape=override), "--device=cpu", "--dtype=float32",
            "--compile=False", "--real_data=False", "--bias=True", f"--batch_size={args.batch_size}",
            f"--block_size={args.seq_len}"]


def run_nanogpt(args: argparse.Namespace, shape: str) -> float:
    out = _run(nanogpt_cmd(args, shape), args.nanogpt, args.threads)
    m = re.search(r"time per iteration: ([0-9.]+)ms", out)
    if m is None:
        sys.exit(f"peers.py: nanoGPT's bench.py printed no time per iteration:\n{out[-2000:]}")
    return float(m.group(1)) / 1000


def gptlab_cmd(args: argparse.Namespace, shape: str) -> list[str]:
    return [sys.executable, "-m", "gptlab", "bench", "--model", shape, "--seq-len", str(args.seq_len),
            "--batch-size", str(args.batch_size), "--device", "cpu", "--dtype", "fp32", "--no-compile",
            "--warmup", str(WARMUP), "--steps", str(STEPS), "--json"]


def run_gptlab(args: argparse.Namespace, shape: str) -> float:
    out = _run(gptlab_cmd(args, shape), ROOT, args.threads)
    return float(json.loads(out.strip().splitlines()[-1])["step_time_s"])


def measure(args: argparse.Namespace, shape: str) -> dict:
    runs = []
    for i in range(args.repeats):
        order = ("nanogpt", "gptlab") if i % 2 == 0 else ("gptlab", "nanogpt")
        row = {"run": i + 1, "load_1min": round(os.getloadavg()[0], 2), "first": order[0]}
        for who in order:
            row[who] = (run_nanogpt if who == "nanogpt" else run_gptlab)(args, shape)
            print(f"peers.py: {shape} run {i + 1}: {who} {row[who]:.3f} s/step", file=sys.stderr, flush=True)
        row["ratio"] = row["nanogpt"] / row["gptlab"]
        runs.append(row)
    med = {k: statistics.median(r[k] for r in runs) for k in ("nanogpt", "gptlab", "ratio")}
    return {"shape": shape, "layers_heads_width": SHAPES[shape], "runs": runs, "median": med}


def format_table(results: list[dict]) -> str:
    lines = ["| shape | run | load (1 min) | nanoGPT bench.py, s/step | gptlab bench, s/step | gptlab speed-up |",
             "|---|---|---|---|---|---|"]
    for res in results:
        for r in res["runs"]:
            lines.append(f"| {res['shape']} | {r['run']} | {r['load_1min']:.2f} | {r['nanogpt']:.3f} | "
                         f"{r['gptlab']:.3f} | {r['ratio']:.2f}x |")
        m = res["median"]
        lines.append(f"| {res['shape']} | median | | {m['nanogpt']:.3f} | {m['gptlab']:.3f} | {m['ratio']:.2f}x |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    shapes = ["gpt2", "tiny"] if args.shape == "both" else [args.shape]
    results = [measure(args, s) for s in shapes]
    if args.json:
        print(json.dumps({"batch_size": args.batch_size, "seq_len": args.seq_len, "threads": args.threads,
                          "warmup": WARMUP, "steps": STEPS, "results": results}))
    else:
        print(format_table(results))
        print("gptlab speed-up = nanoGPT's s/step / gptlab's s/step, per pair of runs; median over the runs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
