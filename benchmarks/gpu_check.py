"""`make gpu-check`: everything a first GPU should tell us, in one run of at most 8 minutes on one GPU.

Steps (each a command of its own, run in order, each with a time limit inside the 8-minute budget;
a step that fails is reported and the others still run):
  gpu-tests    the `gpu` pytest marker tests
  bench-b16/32/64   `gptlab bench` for 124M (gpt2) in bf16, compiled, at B=16, 32 and 64 (T=1024):
               tokens/s, MFU, peak memory; and `gptlab plan --bench` for each (plan vs measured memory)
  fp16         `gptlab bench` in fp16 (the training step with its GradScaler), compiled, B=16
  train        200 steps on the embedded Shakespeare corpus, with evaluation and a checkpoint at step
               100, in two runs: 100 steps, then `--resume` to 200
  hellaswag    `gptlab eval --hellaswag` speed (items/s) on the trained model
  serve        `gptlab serve` throughput, 1 and 32 concurrent clients (benchmarks/serve.py's client)

It writes one markdown report, benchmarks/GPU_CHECK.md (--report PATH), with the device, the date, each
step's command, status, time and numbers. Without a CUDA GPU it says so in one line and exits 2;
--dry-run lists the steps and their commands and exits 0.

    .venv/bin/python benchmarks/gpu_check.py            # or: make gpu-check
    .venv/bin/python benchmarks/gpu_check.py --dry-run
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import platform
import re
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BUDGET_S = 8 * 60
HELLASWAG_TEXT = ROOT.parent / "shared" / "data" / "hellaswag" / "hellaswag_val_full.txt.bz2"
GPTLAB = [sys.executable, "-m", "gptlab"]
MICRO_MODEL = ["--model", "tiny", "--n-layer", "2", "--n-embd", "32", "--n-head", "2", "--seq-len", "64"]


@dataclass
class Step:
    name: str
    what: str
    argv: list[str]
    timeout: float
    numbers: dict = field(default_factory=dict)
    status: str = "not run"
    seconds: float = 0.0
    tail: str = ""


def build_steps(work: Path, micro: bool) -> list[Step]:
    """The steps, in order. micro: the same commands at a micro size on the CPU (for tests)."""
    dev = ["--device", "cpu"] if micro else ["--device", "cuda"]
    model = MICRO_MODEL if micro else ["--model", "gpt2"]
    bench = [*GPTLAB, "bench", *model, *(["--vocab-size", "320"] if micro else []), *dev, "--json",
             *(["--dtype", "fp32", "--no-compile", "--steps", "2", "--warmup", "1"] if micro else
               ["--dtype", "bf16", "--compile", "--steps", "10", "--warmup", "3"])]
    steps = [Step("gpu-tests", "the `gpu` marker tests", [sys.executable, "-m", "pytest", "-q", "-p", "no:warnings",
                  "-m", "gpu", "tests/test_gpu.py"], 100)]
    for b in (16, 32, 64):
        steps.append(Step(f"bench-b{b}", f"bench gpt2 bf16 compiled, B={b}", [*bench, "--batch-size", str(b)], 70))
    fp16 = [a if a not in ("bf16", "fp32") else "fp16" for a in bench]
    steps.append(Step("fp16", "bench in fp16 with the GradScaler, B=16", [*fp16, "--batch-size", "16"], 60))
    data, run = work / "shakespeare", work / "run"
    tokens = "256" if micro else "65536"
    half = 10 if micro else 100  # steps before the resume (the micro run: 20 steps in all)
    train = [*GPTLAB, "train", *model, *dev, "--data", str(data), "--out", str(run), "--total-batch-tokens", tokens,
             "--batch-size", "4" if micro else "16", "--eval-every", str(half), "--eval-tokens", tokens,
             "--checkpoint-every", str(half), "--warmup-steps", "5" if micro else "20", "--lr", "6e-4",
             "--sample-tokens", "8", *(["--dtype", "fp32"] if micro else ["--dtype", "bf16", "--compile"])]
    steps.append(Step("train", "200 steps: 100, then --resume to 200, with evaluation and checkpoints",
                      ["bash", "-c", " && ".join(shlex.join(c) for c in (
                          [*GPTLAB, "prepare", "shakespeare", "--out", str(data)],
                          [*train, "--max-steps", str(half)], [*train, "--max-steps", str(2 * half), "--resume"]))],
                      150))
    items = work / "hellaswag.jsonl"
    steps.append(Step("hellaswag", "HellaSwag speed on the trained model",
                      [*GPTLAB, "eval", str(run), "--hellaswag", "--hellaswag-file", str(items), "--limit",
                       "20" if micro else "1000", *dev, "--json"], 45))
    steps.append(Step("serve", "serve throughput, 1 and 32 clients", [sys.executable, __file__, "--serve-step",
                      str(run), dev[1]], 60))
    return steps


def write_hellaswag_items(path: Path, n: int) -> str:
    """HellaSwag items for the speed step: the real validation set where the shared copy is at hand
    (benchmarks/hellaswag.py reads it), else items of its typical lengths (speed does not depend on the words)."""
    if HELLASWAG_TEXT.is_file():
        items, source = _load_module("hellaswag").read_items(HELLASWAG_TEXT, n), "HellaSwag validation items"
    else:
        words = "the a man woman dog is then runs into house and quickly picks up ball while sitting".split()
        text = lambda k, s: " ".join(words[(s * 7 + i * 3) % len(words)] for i in range(k))  # noqa: E731
        items = [dict(ctx=text(28, i), ctx_a=text(28, i), ctx_b="", activity_label="Synthetic",
                      endings=[text(18, i + j) for j in range(4)], label=i % 4) for i in range(n)]
        source = "synthetic items of HellaSwag's lengths (no local copy of the validation set)"
    path.write_text("".join(json.dumps(item) + "\n" for item in items), encoding="utf-8")
    return source


def _load_module(name: str):
    spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name(f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def serve_step(run: str, device: str) -> None:
    """`gptlab serve RUN --device DEVICE`, loaded by benchmarks/serve.py's clients; one JSON line."""
    serve = _load_module("serve")
    proc = subprocess.Popen([*GPTLAB, "serve", run, "--port", "0", "--device", device, "--max-batch", "32"],
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        while True:
            line = proc.stderr.readline()
            if not line:
                raise SystemExit(f"gptlab serve exited early ({proc.wait()})")
            m = re.search(r"on http://([\d.]+):(\d+)", line)
            if m:
                break
        import threading

        threading.Thread(target=proc.stderr.read, daemon=True).start()
        host, port = m.group(1), int(m.group(2))
        serve.one_request(host, port, "warm-up", 4)
        rows = {c: serve.load(host, port, c, 8 if c == 1 else 2, 32, f"check-{c}") for c in (1, 32)}
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    print(json.dumps({f"tokens_per_s_{c}_clients": round(r["tokens_per_s"], 1) for c, r in rows.items()}
                     | {"p50_s_32_clients": round(rows[32]["p50"], 3)}))


def parse_numbers(step: Step, out: str, work: Path) -> dict:
    """The few numbers each step reports, from its output."""
    docs = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    if step.name.startswith("bench") or step.name == "fp16":
        res = docs[-1]
        (work / f"{step.name}.json").write_text(json.dumps(res))
        nums = {"tokens/s": round(res["tokens_per_s"]), "MFU": None if res["mfu"] is None else round(res["mfu"], 4),
                "peak memory GiB": round(res["peak_memory_bytes"] / 2**30, 2), "last loss": round(res["last_loss"], 3)}
        return nums
    if step.name == "hellaswag":
        n = docs[-1]["hellaswag"]["completion"]["n"]
        return {"items/s (with start-up)": round(n / step.seconds, 1), "n": n,
                "acc_norm": docs[-1]["hellaswag"]["completion"]["acc_norm"]}
    if step.name == "serve":
        return docs[-1] if docs else {}
    if step.name == "train":
        val = re.findall(r"val[ _]loss[ =:]+([0-9.]+)", out)
        return {"resumed": "resum" in out.lower(), "last val loss": val[-1] if val else None}
    if step.name == "gpu-tests":
        marks = "".join(re.sub(r"\s*\[\s*\d+%\]$", "", line) for line in out.splitlines() if line.endswith("%]"))
        return {"passed": marks.count("."), "skipped": marks.count("s"), "failed": marks.count("F") + marks.count("E")}
    return {}


def plan_vs_measured(step: Step, work: Path, micro: bool) -> None:
    """`gptlab plan --bench` for a bench step: the plan's tensors against the measured peak."""
    res = json.loads((work / f"{step.name}.json").read_text())
    model = [*MICRO_MODEL, "--vocab-size", "320"] if micro else ["--model", "gpt2"]
    argv = [*GPTLAB, "plan", *model, "--batch-size", str(res["batch_size"]), "--dtype", res["dtype"],
            "--total-batch-tokens", str(res["batch_size"] * res["seq_len"]), "--max-steps", "19073",
            "--bench", str(work / f"{step.name}.json"), "--json", *(["--no-compile"] if not res["compiled"] else [])]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    if out.returncode == 0:
        doc = json.loads(out.stdout)
        step.numbers["plan total GiB"] = round(doc["memory"]["bytes"]["total"] / 2**30, 2)
        step.numbers["plan/measured"] = round(doc["memory"]["bytes"]["total"] / max(1, res["peak_memory_bytes"]), 3)
        step.numbers["10B tokens, 1 GPU (h)"] = round(doc["time"]["seconds"] / 3600, 1)


def run_steps(steps: list[Step], work: Path, micro: bool, budget: float) -> None:
    t_start = time.monotonic()
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    for step in steps:
        left = budget - (time.monotonic() - t_start)
        if left < 15:
            step.status = "skipped: the 8-minute budget is spent"
            continue
        if step.name == "hellaswag":
            step.numbers["items"] = write_hellaswag_items(work / "hellaswag.jsonl", 20 if micro else 1000)
        t0 = time.monotonic()
        try:
            out = subprocess.run(step.argv, capture_output=True, text=True, cwd=ROOT, env=env,
                                 timeout=min(step.timeout * (4 if micro else 1), left))
            step.seconds = time.monotonic() - t0
            text = out.stdout + out.stderr
            step.status = "ok" if out.returncode == 0 else f"failed (exit {out.returncode})"
            step.tail = "\n".join(text.strip().splitlines()[-12:])
            if out.returncode == 0:
                step.numbers.update(parse_numbers(step, out.stdout if step.name != "train" else text, work))
                if step.name.startswith("bench"):
                    plan_vs_measured(step, work, micro)
        except subprocess.TimeoutExpired:
            step.seconds = time.monotonic() - t0
            step.status = f"timed out after {step.seconds:.0f} s"
        except Exception as e:  # a report with one bad step beats no report
            step.status = f"error: {type(e).__name__}: {e}"
        print(f"gpu_check: {step.name}: {step.status} ({step.seconds:.0f} s) {json.dumps(step.numbers)}", flush=True)


def device_line(micro: bool) -> str:
    import torch

    if micro:
        return f"CPU ({platform.processor() or platform.machine()}), micro size: not GPU numbers"
    p = torch.cuda.get_device_properties(0)
    return f"{torch.cuda.get_device_name(0)}, {p.total_memory / 2**30:.1f} GiB, CUDA {torch.version.cuda}"


def write_report(path: Path, steps: list[Step], micro: bool, wall: float) -> None:
    import torch

    lines = [f"# gpu-check report", "", f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}",
             f"- device: {device_line(micro)}", f"- torch {torch.__version__}, Python {platform.python_version()}",
             f"- load average at the end: {os.getloadavg()[0]:.2f}; wall time {wall:.0f} s of the {BUDGET_S} s budget",
             f"- command: `{shlex.join([sys.executable, *sys.argv])}`", "",
             "| step | what | status | seconds | numbers |", "|---|---|---|---:|---|"]
    for s in steps:
        lines.append(f"| {s.name} | {s.what} | {s.status} | {s.seconds:.0f} | {json.dumps(s.numbers)} |")
    lines += ["", "## Commands", ""] + [f"- {s.name}: `{shlex.join(s.argv)}`" for s in steps]
    failed = [s for s in steps if s.status not in ("ok",) and s.tail]
    for s in failed:
        lines += ["", f"## {s.name}: last lines", "", "```", s.tail, "```"]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def main() -> int:
    if len(sys.argv) == 4 and sys.argv[1] == "--serve-step":
        serve_step(sys.argv[2], sys.argv[3])
        return 0
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dry-run", action="store_true", help="list the steps and their commands; run nothing")
    ap.add_argument("--report", type=Path, default=ROOT / "benchmarks" / "GPU_CHECK.md", help="the markdown report")
    ap.add_argument("--cpu-micro", action="store_true", help=argparse.SUPPRESS)  # the tests' micro run on the CPU
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        work = Path(tmp)
        steps = build_steps(work, args.cpu_micro)
        if args.dry_run:
            for s in steps:
                print(f"{s.name}: {s.what} (at most {s.timeout:.0f} s)\n    {shlex.join(s.argv)}")
            print(f"budget: {BUDGET_S} s on one GPU; report: {args.report}")
            return 0
        import torch

        if not args.cpu_micro and not torch.cuda.is_available():
            print("gpu_check: no CUDA GPU here (torch.cuda.is_available() is False); nothing was run", file=sys.stderr)
            return 2
        t0 = time.monotonic()
        run_steps(steps, work, args.cpu_micro, BUDGET_S * (4 if args.cpu_micro else 1))
        write_report(args.report, steps, args.cpu_micro, time.monotonic() - t0)
    print(f"gpu_check: report in {args.report}")
    return 0 if all(s.status == "ok" for s in steps) else 1


if __name__ == "__main__":
    sys.exit(main())
