"""Muon beside AdamW against the GPT-3 AdamW recipe: same model, tokens, schedule and seeds.

For each setting and seed it trains `--optimizer adamw` and `--optimizer muon` side by side
(cosine schedule, 1/6 warm-up, the same data order), evaluating the val loss every few steps. It
prints the final val of each, and the tokens Muon needs to reach AdamW's final val: read off Muon's
own val curve (linear between evaluations; conservative, since that point of Muon's run has not
had its learning rate decayed yet), and, with --short, checked directly by a Muon run of only
1/1.5 of the tokens. Both curves of every seed go into one chart (gptlab.plot.plot_runs).

    python benchmarks/muon.py --setting tiny --data data/shakespeare --seeds 1337 1338 --steps 150
    python benchmarks/muon.py --setting 20m --data data/legal --seeds 1337 --steps 120
    python benchmarks/muon.py --setting tiny --step-cost     # one Muon step: torch's bf16 iteration vs fp32,
                                                             # then each rank's Newton-Schulz time on 1 vs 2 gloo ranks

Finished runs (a checkpoint at the last step) are reused, so an interrupted benchmark continues.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from gptlab.plot import plot_runs
from gptlab.rundir import RunDir

# (model flags, tokens per step, eval every N steps, eval tokens)
SETTINGS = {
    # the tiny preset (7.2M parameters, T=128) on Shakespeare
    "tiny": (dict(model="tiny"), 4096, 10, 40960),
    # ~20M parameters (20.5M: 6 layers, width 288, T=256), GPT-2's vocabulary
    "20m": (dict(model="tiny", n_layer=6, n_head=6, n_embd=288, seq_len=256), 8192, 10, 65536),
}
ADAMW_LR = 3e-3  # tiny's preset lr; also AdamW's lr for the embeddings/head/gains inside `muon`
MUON_LR = 0.02


def train_command(args, out: Path, optimizer: str, seed: int, steps: int) -> list[str] | None:
    """The `gptlab train` command of one run, or None when it finished earlier (reused)."""
    model_flags, batch, every, eval_tokens = SETTINGS[args.setting]
    latest = RunDir(out).latest_checkpoint()
    if latest is not None and latest.name == f"step_{steps:06d}":
        print(f"  {out.name}: done earlier, reused", file=sys.stderr)
        return None
    if out.exists():
        shutil.rmtree(out)  # an unfinished earlier attempt
    flags = dict(model_flags, data=args.data, out=str(out), seed=seed, optimizer=optimizer, max_steps=steps,
                 total_batch_tokens=args.batch_tokens or batch, batch_size=16 if args.setting == "tiny" else 8,
                 lr=ADAMW_LR, muon_lr=MUON_LR, schedule="cosine", warmup_frac=1 / 6,
                 eval_every=args.eval_every or every, eval_tokens=args.eval_tokens or eval_tokens,
                 sample_tokens=0, checkpoint_every=0, keep_checkpoints=1, device="cpu", dtype="fp32")
    cmd = [sys.executable, "-m", "gptlab", "train", "--no-compile"]
    for k, v in flags.items():
        cmd += [f"--{k.replace('_', '-')}", str(v)]
    return cmd


def run_all(jobs: list[tuple[Path, list[str] | None]], parallel: int) -> None:
    """Run the commands, `parallel` at a time (each with 1/parallel of the threads); print each
    run's wall and CPU seconds (CPU time is what a loaded machine does not inflate)."""
    threads = max(1, (os.cpu_count() or 1) // parallel)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    todo = [(out, cmd) for out, cmd in jobs if cmd is not None]
    running: dict[int, tuple[Path, float, subprocess.Popen]] = {}
    while todo or running:
        while todo and len(running) < parallel:
            out, cmd = todo.pop(0)
            proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            running[proc.pid] = (out, time.time(), proc)
        pid, status, usage = os.wait4(-1, 0)
        if pid not in running:
            continue
        out, t0, proc = running.pop(pid)
        err = proc.stderr.read()
        if status != 0:
            raise SystemExit(f"{out}: gptlab train failed:\n{err[-2000:]}")
        cpu = usage.ru_utime + usage.ru_stime
        print(f"  {out.name}: {time.time() - t0:.0f} s wall, {cpu:.0f} s CPU ({threads} thread(s))", file=sys.stderr)


def val_curve(run: Path) -> list[tuple[int, float]]:
    """[(tokens, val loss)] of a run, in order."""
    pts = []
    for line in (run / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if rec.get("kind") == "val":
            pts.append((int(rec["tokens"]), float(rec["loss"])))
    return pts


def tokens_to_reach(curve: list[tuple[int, float]], target: float) -> float | None:
    """Tokens at which the curve first reaches `target`, linear between evaluations (None: never)."""
    prev = None
    for tok, loss in curve:
        if loss <= target:
            if prev is None:
                return float(tok)
            (t0, l0), (t1, l1) = prev, (tok, loss)
            return t0 + (l0 - target) / (l0 - l1) * (t1 - t0)
        prev = (tok, loss)
    return None


def _mean_sd(xs: list[float]) -> str:
    if len(xs) == 1:
        return f"{xs[0]:.3f}"
    return f"{statistics.mean(xs):.3f} ± {statistics.stdev(xs):.3f}"


def step_cost(setting: str, repeats: int = 5) -> int:
    """One Muon step over the setting's block matrices: torch.optim.Muon (its Newton-Schulz in bf16)
    against gptlab.optim.Muon with the iteration in fp32, side by side, and the largest difference
    of their updates (the step after 3 equal warm-up steps)."""
    import torch

    from gptlab.config import model_preset
    from gptlab.model import GPT
    from gptlab.optim import Muon, muon_split
    from gptlab.runtime import native_bf16_matmul

    model_flags = dict(SETTINGS[setting][0])
    cfg = model_preset(model_flags.pop("model"), **model_flags)
    kw = dict(lr=MUON_LR, momentum=0.95, nesterov=True, weight_decay=0.0, adjust_lr_fn="original")
    torch.manual_seed(0)
    grads = None
    results = {}
    for name, make in (("torch.optim.Muon (bf16 Newton-Schulz)", lambda ps: torch.optim.Muon(ps, **kw)),
                       ("gptlab.optim.Muon (fp32 Newton-Schulz)", lambda ps: Muon(ps, ns_fp32=True, **kw))):
        torch.manual_seed(0)
        params, _ = muon_split(GPT(cfg))
        if grads is None:
            grads = [torch.randn_like(p) for p in params]
        opt = make(params)
        times = []
        for i in range(3 + repeats):
            for p, g in zip(params, grads):
                p.grad = g.clone()
            before = [p.detach().clone() for p in params]
            t0 = time.perf_counter()
            opt.step()
            times.append(time.perf_counter() - t0)
        results[name] = (statistics.median(times[3:]), [b - p.detach() for b, p in zip(before, params)])
    print(f"{setting}: {len(grads)} block matrices, {sum(g.numel() for g in grads):,} weights; "
          f"native bf16 matmuls on this CPU: {native_bf16_matmul('cpu')}; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    print("| optimizer | seconds per step (median of %d) |" % repeats)
    print("|---|---|")
    for name, (t, _) in results.items():
        print(f"| {name} | {t:.4f} |")
    (_, a), (_, b) = results.values()
    diff = max(float((x - y).abs().max() / y.abs().max()) for x, y in zip(a, b))
    print(f"largest difference of the two updates, relative to the update's largest entry: {diff:.2e}")
    return 0


def _rank_cost(rank: int, n: int, port: int, setting: str, placement: str, repeats: int, out: str) -> None:
    """One gloo rank of shared_cost: Muon steps over the setting's block matrices, replicated (DDP)
    or row-sharded (FSDP2), with the same gradients every step; this rank's medians to out/rank<R>.json."""
    import datetime

    import torch
    import torch.distributed as tdist

    from gptlab.config import model_preset
    from gptlab.model import GPT
    from gptlab.optim import Muon, muon_split
    from gptlab.parallel import shard_model
    from gptlab.runtime import get_runtime, native_bf16_matmul

    from gptlab import muon as muon_mod

    torch.set_num_threads(1)  # every rank one core, whatever the number of ranks
    cpu = [0.0]  # this thread's CPU seconds in Newton-Schulz: what a loaded machine does not inflate
    plain_ns = muon_mod.newton_schulz

    def timed_ns(*a, **kw):
        t0 = time.thread_time()
        try:
            return plain_ns(*a, **kw)
        finally:
            cpu[0] += time.thread_time() - t0

    muon_mod.newton_schulz = timed_ns
    tdist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=n,
                             timeout=datetime.timedelta(seconds=600))
    model_flags = dict(SETTINGS[setting][0])
    torch.manual_seed(0)
    model = GPT(model_preset(model_flags.pop("model"), **model_flags))
    if placement == "fsdp":
        shard_model(model, get_runtime("cpu", "fp32", False))
    params, _ = muon_split(model)
    g = torch.Generator().manual_seed(1)
    grads = [torch.randn(p.shape, generator=g) for p in params]
    if placement == "fsdp":
        from torch.distributed.tensor import Shard, distribute_tensor

        grads = [distribute_tensor(x, p.device_mesh, [Shard(0)]) for x, p in zip(grads, params)]
    opt = Muon(params, lr=MUON_LR, momentum=0.95, nesterov=True, weight_decay=0.0, adjust_lr_fn="original",
               ns_fp32=not native_bf16_matmul("cpu"), shared=True)
    ns, wall, ns_cpu = [], [], []
    for i in range(2 + repeats):
        for p, x in zip(params, grads):
            p.grad = x
        tdist.barrier()
        cpu[0] = 0.0
        t0 = time.perf_counter()
        opt.step()
        wall.append(time.perf_counter() - t0)
        ns.append(opt.ns_seconds)
        ns_cpu.append(cpu[0])
    Path(out, f"rank{rank}.json").write_text(json.dumps(
        {"matrices": opt.ns_matrices, "of": len(params), "ns": statistics.median(ns[2:]),
         "ns_cpu": statistics.median(ns_cpu[2:]),
         "step": statistics.median(wall[2:])}))
    tdist.destroy_process_group()


def shared_cost(setting: str, ranks: list[int], repeats: int = 5, rounds: int = 1) -> None:
    """Each rank's Newton-Schulz time in one Muon step, on 1 and on N gloo ranks (one thread each),
    for replicated (DDP) and row-sharded (FSDP) matrices: gptlab.muon shares the matrices over the
    ranks, so each rank's time falls as 1/N while the whole step adds the gathers. `rounds` repeats
    the sweep, alternating, to show the spread on a shared machine; each row has the load average."""
    import socket
    import tempfile

    import torch.multiprocessing as mp

    print(f"\n{setting}: each rank's share of one Muon step ({repeats} timed steps after 2 warm-up; 1 thread a rank)")
    print("| placement | ranks | rank | matrices it orthogonalises | Newton-Schulz CPU s a step | Newton-Schulz "
          "wall s | whole Muon step wall s | load average (1 min) |")
    print("|---|---|---|---|---|---|---|---|")
    for placement, n in [(pl, n) for _ in range(rounds) for pl in ("ddp", "fsdp") for n in ranks]:
        with socket.socket() as sock, tempfile.TemporaryDirectory() as out:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
            sock.close()
            mp.spawn(_rank_cost, args=(n, port, setting, placement, repeats, out), nprocs=n)
            for r in range(n):
                res = json.loads(Path(out, f"rank{r}.json").read_text())
                print(f"| {placement} | {n} | {r} | {res['matrices']} of {res['of']} | {res['ns_cpu']:.4f} | "
                      f"{res['ns']:.4f} | "
                      f"{res['step']:.4f} | {os.getloadavg()[0]:.1f} |", flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--setting", choices=sorted(SETTINGS), default="tiny")
    ap.add_argument("--data", default="data/shakespeare")
    ap.add_argument("--seeds", type=int, nargs="+", default=[1337, 1338, 1339])
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--short", action="store_true", help="also train Muon for steps/1.5 and compare its final val")
    ap.add_argument("--out", default="runs/bench-muon")
    ap.add_argument("--parallel", type=int, default=1, help="runs at a time (each gets cores/parallel threads)")
    ap.add_argument("--batch-tokens", type=int, default=None, help="tokens per step (default: the setting's)")
    ap.add_argument("--eval-every", type=int, default=None, help="steps between val evaluations")
    ap.add_argument("--eval-tokens", type=int, default=None, help="val tokens per evaluation")
    ap.add_argument("--step-cost", action="store_true",
                    help="only time one Muon step: torch's bf16 Newton-Schulz against gptlab's fp32 one, then "
                         "each rank's Newton-Schulz time on each of --ranks gloo ranks")
    ap.add_argument("--ranks", type=int, nargs="+", default=[1, 2], help="--step-cost: gloo ranks to compare")
    ap.add_argument("--rounds", type=int, default=1, help="--step-cost: times to repeat the ranks sweep")
    ap.add_argument("--repeats", type=int, default=5, help="--step-cost: timed steps (the median is printed)")
    args = ap.parse_args()
    if args.step_cost:
        step_cost(args.setting, args.repeats)
        shared_cost(args.setting, args.ranks, args.repeats, args.rounds)
        return 0
    root = Path(args.out) / args.setting
    batch = args.batch_tokens or SETTINGS[args.setting][1]
    tokens = args.steps * batch
    short_steps = int(round(args.steps / 1.5))
    jobs = []
    for seed in args.seeds:
        for name, opt, steps in [("adamw", "adamw", args.steps), ("muon", "muon", args.steps)] + (
                [("muon-short", "muon", short_steps)] if args.short else []):
            out = root / f"{name}-s{seed}"
            jobs.append((out, train_command(args, out, opt, seed, steps)))
    run_all(jobs, args.parallel)
    rows, runs = [], []
    for seed in args.seeds:
        a, m = root / f"adamw-s{seed}", root / f"muon-s{seed}"
        runs += [a, m]
        a_final, m_final = val_curve(a)[-1][1], val_curve(m)[-1][1]
        reach = tokens_to_reach(val_curve(m), a_final)
        row = dict(seed=seed, adamw=a_final, muon=m_final, reach=reach,
                   ratio=tokens / reach if reach else None)
        if args.short:
            row["muon_short"] = val_curve(root / f"muon-short-s{seed}")[-1][1]
        rows.append(row)
    print(f"\n{args.setting}: {tokens:,} tokens per run ({args.steps} steps), seeds {args.seeds}")
    print("| seed | AdamW final val | Muon final val | Muon tokens to AdamW's final val | fewer tokens |"
          + (f" Muon, {short_steps} steps ({short_steps * SETTINGS[args.setting][1]:,} tokens): final val |"
             if args.short else ""))
    print("|---|---|---|---|---|" + ("---|" if args.short else ""))
    for r in rows:
        reach = f"{r['reach']:,.0f}" if r["reach"] else "not reached"
        ratio = f"{r['ratio']:.2f}x" if r["ratio"] else "-"
        extra = f" {r['muon_short']:.3f} |" if args.short else ""
        print(f"| {r['seed']} | {r['adamw']:.3f} | {r['muon']:.3f} | {reach} | {ratio} |{extra}")
    ratios = [r["ratio"] for r in rows if r["ratio"]]
    print(f"| mean | {_mean_sd([r['adamw'] for r in rows])} | {_mean_sd([r['muon'] for r in rows])} | "
          f"| {_mean_sd(ratios) + 'x' if ratios else '-'} |"
          + (f" {_mean_sd([r['muon_short'] for r in rows])} |" if args.short else ""))
    charts = plot_runs(runs, root / "compare")
    print("charts: " + ", ".join(str(c) for c in charts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
