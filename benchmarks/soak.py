"""A soak of a long job: a 2-rank streamed run, self-launched through torchrun with restarts and
`--resume auto`, while faults are injected at random moments (seeded):

    kill    SIGKILL of one worker (torchrun restarts the group)
    term    SIGTERM of the launcher (it saves and exits), then the same command again
    server  the HTTP server that streams the shards gone for 20 s (`--server-down`)
    stop    SIGSTOP of one worker (the others' stall watchdog ends the group, torchrun restarts it)
    disk    the run's disk full for 15 s (`--disk-full`; a tmpfs in a private mount namespace,
            re-executed under `unshare -m`; where none can be mounted this fault is not injected)

A supervisor stands in for the scheduler: whenever the launcher exits before the last step, it runs
the very same command line again (SLURM's requeue, a spot supervisor). At the end it checks, against
an unbroken run of the same command:
- the per-step train and val losses are equal (1e-6);
- no shard was fetched more than once per epoch, plus once per worker start (issue 22, item 8);
- no temporary file is left in the run directory;
- metrics.jsonl holds one record per (step, kind);
and prints a table of the faults injected, survived, and the steps redone after each.

    .venv/bin/python benchmarks/soak.py [--seconds 600] [--seed 0] [--json FILE] [--faults kill,term,...]

tests/test_soak.py runs a short soak of every fault (a slow test, run in CI); a longer one is this
script with a larger --seconds. Exit status: 0 when every check passed, 1 when one failed.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "tests"))

from gptlab.atomic import is_temporary  # noqa: E402
from gptlab.data import shards as sh  # noqa: E402
from gptlab.tokenizer import EOT_TOKEN  # noqa: E402
from shard_server import ShardServer  # noqa: E402

FAULTS = ("kill", "term", "server", "stop", "disk")
STALL_TIMEOUT = 8  # the watchdog's: a stopped rank ends the group after this
CHECKPOINT_EVERY = 10
ENV = {"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "TORCH_ELASTIC_SHUTDOWN_TIMEOUT": "10",
       "GPTLAB_STREAM_BACKOFF": "0.5", "GPTLAB_STREAM_TIMEOUT": "5"}
STARTED = re.compile(r"gptlab train: [\d.]+M parameters")  # rank 0, at every start of the group
RESUMED = re.compile(r"gptlab train: resumed from \S+ at step (\d+)")


@dataclass
class Fault:
    kind: str
    at_step: int  # injected once the run has logged this step
    injected: bool = False
    survived: bool = False
    redone: int = 0  # steps trained again after it (the work lost)
    note: str = ""
    t: float = 0.0
    over: bool = False
    # set once the fault's condition has ended (the server back, the disk freed; at once for a signal):
    # the next fault waits for it, so that each recovery is that fault's own and no other's
    over_step: int | None = None  # the high-water step when it was seen over; survived once a
    # checkpoint after that step is saved (a save that met the full disk a moment before it was
    # freed fails later: the next fault must not land on that failure)


@dataclass
class Soak:
    seconds: float
    seed: int
    faults: list[str]
    steps: int = 0
    starts: int = 0  # launcher starts (the supervisor's reruns + 1)
    worker_starts: int = 0  # group starts seen in the logs (torchrun restarts included)
    checks: dict[str, str] = field(default_factory=dict)
    injected: list[Fault] = field(default_factory=list)
    fetches: dict[str, int] = field(default_factory=dict)
    wall_s: float = 0.0
    unbroken_s: float = 0.0


def write_dataset(d: Path, n_train: int, shard_tokens: int, seed: int = 0) -> None:
    """Learnable tokens (a few-state Markov chain over 300 ids) in n_train shards and one val shard."""
    d.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    entries = []
    for i in range(n_train + 1):
        split = "val" if i == 0 else "train"
        state, toks = 0, np.empty(shard_tokens, dtype=np.uint16)
        jumps = rng.integers(0, 300, shard_tokens)
        coin = rng.random(shard_tokens)
        for j in range(shard_tokens):
            state = (state * 7 + 3) % 300 if coin[j] < 0.8 else int(jumps[j])
            toks[j] = state
        name = sh.shard_name("soak", split, i)
        entries.append({"file": name, "split": split, "tokens": shard_tokens,
                        "sha256": sh.write_shard(d / name, toks), "documents": int((toks == EOT_TOKEN).sum())})
    sh.write_manifest(d, {"format": sh.FORMAT, "format_version": sh.FORMAT_VERSION,
                          "source": {"name": "soak"}, "shards": entries})


def train_cmd(url: str, out: Path, cache: Path, steps: int) -> list[str]:
    return [sys.executable, "-m", "gptlab", "train", "--nproc", "2", "--max-restarts", "3", "--resume", "auto",
            "--model", "tiny", "--n-layer", "2", "--n-head", "2", "--n-embd", "32", "--seq-len", "32", "--vocab-size", "320",
            "--data", url, "--data-cache", str(cache), "--data-disk-budget", "64K",
            "--batch-size", "4", "--total-batch-tokens", "256", "--max-steps", str(steps), "--lr", "3e-3",
            "--warmup-steps", "5", "--eval-every", "25", "--eval-tokens", "2048", "--sample-tokens", "0",
            "--checkpoint-every", str(CHECKPOINT_EVERY), "--keep-checkpoints", "2", "--stall-timeout", str(STALL_TIMEOUT),
            "--device", "cpu", "--seed", "7", "--out", str(out)]


def records(run: Path) -> list[dict]:
    m = run / "metrics.jsonl"
    if not m.exists():
        return []
    out = []
    for line in m.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            out.append({"kind": "<broken line>", "step": -1, "line": line})
    return out


def last_step(run: Path) -> int:
    return max((r["step"] for r in records(run) if r.get("kind") == "train"), default=0)


def workers(launcher: int) -> dict[int, int]:
    """rank -> pid of the launcher's worker processes."""
    out = {}
    for pid in subprocess.run(["pgrep", "-P", str(launcher)], capture_output=True, text=True).stdout.split():
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        for kv in env:
            if kv.startswith(b"RANK="):
                out[int(kv[5:])] = int(pid)
    return out


class Disk:
    """The run's disk: a tmpfs of its own when this process may mount one, else a plain directory."""

    def __init__(self, where: Path, mount: bool) -> None:
        self.path = where
        where.mkdir(parents=True, exist_ok=True)
        self.mounted = mount and subprocess.run(["mount", "-t", "tmpfs", "-o", "size=150m", "tmpfs", str(where)],
                                                capture_output=True).returncode == 0
        self.filler = where / "filler"

    def fill(self) -> None:
        fd = os.open(self.filler, os.O_WRONLY | os.O_CREAT, 0o644)
        block = b"\0" * (1 << 16)
        try:
            while os.write(fd, block):
                pass
        except OSError:  # ENOSPC: the disk is full
            pass
        finally:
            os.close(fd)

    def free(self) -> None:
        self.filler.unlink(missing_ok=True)


class Supervisor:
    """Runs the command until the run reaches its last step, again after every exit (a requeue),
    injecting each due fault. Watches metrics.jsonl for the high-water step and the logs for resumes."""

    def __init__(self, cmd, run: Path, steps: int, plan: list[Fault], server: "Server", disk: Disk, log: Path,
                 rng: random.Random, report: Soak) -> None:
        self.cmd, self.run, self.steps, self.plan = cmd, run, steps, plan
        self.server, self.disk, self.log, self.rng, self.report = server, disk, log, rng, report
        self.high = 0  # the highest step logged so far, across attempts
        self.current: Fault | None = None  # the fault whose recovery is under way
        self.seen_log = 0
        self.t0 = time.time()

    def go(self, deadline: float) -> None:
        env = {**os.environ, **ENV}
        while time.time() < deadline:
            self.report.starts += 1
            self.event(f"launcher start {self.report.starts}")
            with open(self.log, "a") as out:
                proc = subprocess.Popen(self.cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
            try:
                while proc.poll() is None and time.time() < deadline:
                    self._watch(proc)
                    time.sleep(0.1)
            finally:
                if proc.poll() is None:
                    self._kill_all(proc)
            self._read_log()
            self.event(f"launcher exited with status {proc.returncode}")
            if proc.returncode == 0 and last_step(self.run) >= self.steps:
                fault = self.current
                if fault is not None and fault.over:  # the run reached its end after it
                    self.event(f"{fault.kind} survived (the run ended)")
                    fault.survived, self.current = True, None
                return
            time.sleep(1.0)  # the scheduler's requeue delay
        raise TimeoutError("the run did not finish in time")

    def _watch(self, proc: subprocess.Popen) -> None:
        self._read_log()
        self.high = max(self.high, last_step(self.run))
        fault = self.current
        if fault is not None and fault.kind == "disk" and not fault.over \
                and (self.high > fault.at_step + 12 or time.time() > fault.t + 15.0):
            self.disk.free()  # a checkpoint save has met the full disk (or 15 s passed)
            fault.over = True
            self.event("disk freed")
        if fault is not None and fault.over and fault.over_step is None:
            fault.over_step = self.high
        if fault is not None and fault.over_step is not None and self.high > fault.over_step + CHECKPOINT_EVERY:
            self.event(f"{fault.kind} survived")
            fault.survived = True  # training went on past the next checkpoint, the fault over
            self.current = None
        if self.current is None:
            due = next((f for f in self.plan if not f.injected and self.high >= f.at_step), None)
            if due is not None:
                self._inject(due, proc)

    def event(self, what: str) -> None:
        """One line of the timeline on stderr: seconds since the start, the high-water step, what."""
        print(f"soak: {time.time() - self.t0:7.1f} s  step {self.high:4d}  {what}", file=sys.stderr, flush=True)

    def _read_log(self) -> None:
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        new, self.seen_log = text[self.seen_log:], len(text)
        for m in RESUMED.finditer(new):
            if self.current is not None or self.report.injected:
                fault = self.current or self.report.injected[-1]
                fault.redone += max(0, self.high - int(m.group(1)))
        self.report.worker_starts += len(STARTED.findall(new))

    def _inject(self, fault: Fault, proc: subprocess.Popen) -> None:
        fault.injected, fault.t = True, time.time()
        self.current = fault
        self.report.injected.append(fault)
        ranks = workers(proc.pid)
        rank = self.rng.choice(sorted(ranks)) if ranks else None
        fault.over = fault.kind in ("kill", "stop", "term")  # a signal is over once sent
        self.event(f"inject {fault.kind}" + (f" (rank {rank})" if fault.kind in ("kill", "stop") else ""))
        if fault.kind == "kill" and rank is not None:
            os.kill(ranks[rank], signal.SIGKILL)
            fault.note = f"rank {rank}"
        elif fault.kind == "stop" and rank is not None:
            os.kill(ranks[rank], signal.SIGSTOP)
            fault.note = f"rank {rank}"
        elif fault.kind == "term":
            proc.send_signal(signal.SIGTERM)
        elif fault.kind == "server":
            threading.Thread(target=self.server.down, args=(20.0, fault), daemon=True).start()
            fault.note = "20 s"
        elif fault.kind == "disk":
            if not self.disk.mounted:
                fault.note = "not injected: no tmpfs could be mounted here"
                fault.injected = False
                self.current = None
                return
            self.disk.fill()  # freed by _watch once a checkpoint save has met it, or after 15 s
            fault.note = "until a save met it, at most 15 s"
        else:
            fault.note, fault.injected, self.current = "no worker to signal", False, None

    def _kill_all(self, proc: subprocess.Popen) -> None:
        for pid in workers(proc.pid).values():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.kill()
        proc.wait()


class Server:
    """The shard server, which can go away for a while and come back at the same URL; the request
    log survives it."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.srv = ShardServer(root)
        self.port = self.srv.httpd.server_address[1]
        self.url = self.srv.url
        self.requests: list[str] = self.srv.requests

    def down(self, seconds: float, fault: Fault) -> None:
        self.srv.stop()
        time.sleep(seconds)
        srv = ShardServer(self.root, port=self.port)
        srv.requests = self.requests
        self.srv = srv
        fault.over = True

    def stop(self) -> None:
        self.srv.stop()


def shard_fetches(requests: list[str]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for path in requests:
        name = path.rsplit("/", 1)[-1]
        if name.endswith(".bin"):
            counts[name] = counts.get(name, 0) + 1
    return counts


def losses(run: Path) -> dict[str, float]:
    return {f"{r['kind']}:{r['step']}": r["loss"] for r in records(run) if r.get("kind") in ("train", "val")}


def check(report: Soak, run: Path, ref: Path, epochs: int) -> None:
    got, want = losses(run), losses(ref)
    worst = max((abs(got[k] - want[k]) for k in want if k in got), default=float("inf"))
    report.checks["losses equal the unbroken run"] = (
        "ok" if got.keys() == want.keys() and worst <= 1e-6
        else f"FAILED: {len(set(want) ^ set(got))} records differ in presence, worst |diff| {worst:.3g}")
    keys = [(r.get("kind"), r.get("step")) for r in records(run)]
    dup = len(keys) - len(set(keys))
    broken = sum(1 for k, _ in keys if k == "<broken line>")
    report.checks["one metrics record per (step, kind)"] = (
        "ok" if not dup and not broken else f"FAILED: {dup} repeated, {broken} unreadable lines")
    temps = [str(p.relative_to(run)) for p in run.rglob("*") if is_temporary(p.name)]
    report.checks["no temporary leftovers"] = "ok" if not temps else f"FAILED: {temps[:5]}"
    allowed = 2 * (epochs + report.worker_starts)  # each rank: once an epoch, plus once per start
    worst_shard = max(report.fetches.values(), default=0)
    report.checks["shards fetched once per epoch plus once per start"] = (
        "ok" if worst_shard <= allowed else f"FAILED: a shard fetched {worst_shard} times, at most {allowed}")
    survived = all(f.survived for f in report.injected if f.injected)
    report.checks["every injected fault survived"] = "ok" if survived else "FAILED"


def table(report: Soak) -> str:
    rows = ["| fault | at step | injected | survived | steps redone | note |", "|---|---|---|---|---|---|"]
    for f in report.injected:
        rows.append(f"| {f.kind} | {f.at_step} | {'yes' if f.injected else 'no'} | "
                    f"{'yes' if f.survived else 'no'} | {f.redone} | {f.note} |")
    n_inj = sum(f.injected for f in report.injected)
    n_surv = sum(f.survived for f in report.injected if f.injected)
    rows.append(f"\n{n_inj} faults injected, {n_surv} survived, {sum(f.redone for f in report.injected)} steps "
                f"redone; {report.steps} steps in {report.wall_s:.0f} s (unbroken: {report.unbroken_s:.0f} s), "
                f"{report.starts} launcher starts, {report.worker_starts} group starts")
    rows += [f"- {name}: {res}" for name, res in report.checks.items()]
    return "\n".join(rows)


def soak(args, work: Path) -> Soak:
    rng = random.Random(args.seed)
    kinds = [k for k in args.faults]
    report = Soak(seconds=args.seconds, seed=args.seed, faults=kinds, steps=args.steps)
    data = work / "www" / "soak"
    write_dataset(data, n_train=args.shards, shard_tokens=args.shard_tokens, seed=args.seed)
    server = Server(work / "www")
    url = f"{server.url}/soak"
    try:
        t0 = time.time()
        ref = work / "unbroken"
        r = subprocess.run(train_cmd(url, ref, work / "cache_ref", args.steps), capture_output=True, text=True,
                           env={**os.environ, **ENV}, timeout=args.seconds)
        report.unbroken_s = time.time() - t0
        if r.returncode != 0:
            raise SystemExit(f"soak: the unbroken run failed:\n{r.stderr[-3000:]}")
        server.requests.clear()
        disk = Disk(work / "disk", mount=args.in_namespace)
        run = disk.path / "run"
        order = rng.sample(kinds, len(kinds))
        # the faults' earliest steps in the first half: each waits for the one before it to be survived
        # (a 20 s outage can outlast 40 fast steps), and the last needs steps left after it
        spots = sorted(rng.sample(range(12, max(12 + len(order), args.steps // 2)), len(order)))
        plan = [Fault(kind, at) for kind, at in zip(order, spots)]
        sup = Supervisor(train_cmd(url, run, work / "cache", args.steps), run, args.steps, plan, server, disk,
                         work / "soak.log", rng, report)
        t0 = time.time()
        sup.go(deadline=t0 + args.seconds)
        report.wall_s = time.time() - t0
        for f in plan:
            if f not in report.injected:
                f.note = "not reached"
                report.injected.append(f)
        report.fetches = shard_fetches(server.requests)
        epochs = 1 + (args.steps * 256) // (args.shards * args.shard_tokens)
        check(report, run, ref, epochs)
        shutil.copy(run / "metrics.jsonl", work / "soak_metrics.jsonl")
        if (run / "stalls").is_dir():  # the watchdog's stack dumps, kept outside the run's tmpfs
            shutil.copytree(run / "stalls", work / "stalls", dirs_exist_ok=True)
    finally:
        server.stop()
    return report


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=600, help="time allowed for the faulted run")
    p.add_argument("--steps", type=int, default=300, help="steps of the run")
    p.add_argument("--shards", type=int, default=12, help="train shards")
    p.add_argument("--shard-tokens", type=int, default=4096, help="tokens per shard")
    p.add_argument("--seed", type=int, default=0, help="the faults' order and moments")
    p.add_argument("--faults", default=",".join(FAULTS), help="which faults, comma-separated: " + ",".join(FAULTS))
    p.add_argument("--json", help="also write the report as JSON to this file")
    p.add_argument("--workdir", help="keep the soak's files here (default: a temporary directory)")
    p.add_argument("--in-namespace", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    args.faults = [f for f in args.faults.split(",") if f]
    bad = [f for f in args.faults if f not in FAULTS]
    if bad:
        p.error(f"unknown faults {bad}; choose from {','.join(FAULTS)}")
    if "disk" in args.faults and not args.in_namespace and shutil.which("unshare") \
            and subprocess.run(["unshare", "-m", "true"], capture_output=True).returncode == 0:
        # a private mount namespace, where this process may mount the run's tmpfs
        return subprocess.run(["unshare", "-m", sys.executable, __file__, *sys.argv[1:], "--in-namespace"]).returncode
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="gptlab-soak-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"soak: {args.steps} steps, faults {','.join(args.faults)}, seed {args.seed}, in {work} "
          f"(load average {os.getloadavg()[0]:.1f})", file=sys.stderr)
    report = soak(args, work)
    print(table(report))
    if args.json:
        Path(args.json).write_text(json.dumps(asdict(report), indent=2))
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if all(v == "ok" for v in report.checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
