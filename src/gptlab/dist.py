"""Everything distributed: torchrun's environment, the process group,
reductions, and self-launch through torchrun. Other modules ask `env.is_main` or `env.world_size`.
"""

from __future__ import annotations

import datetime
import logging
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass
from typing import Callable, TypeVar

import torch
import torch.distributed as tdist

from gptlab.atomic import write_text
from gptlab.errors import PeerFailure, UserError

T = TypeVar("T")


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    local_world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    def device(self, device: torch.device) -> torch.device:
        """This rank's device: cuda:LOCAL_RANK under torchrun on CUDA (one GPU a process), else `device`."""
        if device.type == "cuda" and self.is_distributed:
            return torch.device("cuda", self.local_rank)
        return device


def env_from_torchrun() -> DistEnv:
    """Read RANK/LOCAL_RANK/WORLD_SIZE as torchrun sets them (a single process otherwise)."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return DistEnv()
    return DistEnv(
        rank=int(os.environ["RANK"]),
        local_rank=int(os.environ.get("LOCAL_RANK", 0)),
        world_size=int(os.environ["WORLD_SIZE"]),
        local_world_size=int(os.environ.get("LOCAL_WORLD_SIZE", os.environ["WORLD_SIZE"])),
    )


def init(device_type: str = "cpu", timeout_s: float = 600.0) -> DistEnv:
    """Start the process group when launched by torchrun: nccl on CUDA, gloo otherwise.
    The timeout makes surviving ranks fail instead of hanging when one dies."""
    env = env_from_torchrun()
    if env.is_distributed and not tdist.is_initialized():
        backend = "nccl" if device_type == "cuda" else "gloo"
        kwargs = {}
        if device_type == "cuda":
            torch.cuda.set_device(env.local_rank)
            kwargs["device_id"] = env.device(torch.device("cuda"))
        timeout = datetime.timedelta(seconds=timeout_s)
        store = _attempt_store(timeout)
        if store is not None:
            kwargs.update(store=store, rank=env.rank, world_size=env.world_size)
        tdist.init_process_group(backend=backend, timeout=timeout, **kwargs)
    return env


def _attempt_store(timeout: datetime.timedelta):
    """The store for this attempt's process group under torchrun restarts, or None (torch's own).
    torchrun's agent hosts one TCPStore for every attempt of its workers (TORCHELASTIC_USE_AGENT_STORE),
    so a restarted group can read a dead attempt's keys (its peers' addresses) and fail or hang
    joining. With one agent (one node: --standalone, gptlab's --nproc) every worker knows the same
    TORCHELASTIC_RESTART_COUNT, and keys under it are this attempt's alone. Across nodes the agents
    count restarts apart, so only TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 (a store per attempt) helps."""
    if int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0") or 0) <= 0:
        return None
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None  # rank 0 hosts a new store each attempt
    if os.environ.get("GROUP_WORLD_SIZE", "1") != "1":
        if os.environ.get("RANK") == "0" and os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0":
            print("gptlab: torchrun restarts over several nodes: set TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 "
                  "for torchrun, or a restarted group may join with a dead attempt's addresses",
                  file=sys.stderr, flush=True)
        return None
    from torch.distributed.rendezvous import rendezvous

    store, _, _ = next(rendezvous("env://", timeout=timeout))
    store.set_timeout(timeout)
    return tdist.PrefixStore(f"gptlab/attempt_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)


def shutdown() -> None:
    """Destroy the process group. The rank-0 section namespace lets go of it first: a process group
    still referenced at interpreter exit is destroyed during finalization, where gloo aborted the
    process ("terminate called without an active exception", exit -6) in about one run in five."""
    global _namespace
    _namespace = None
    if tdist.is_initialized():
        try:
            tdist.destroy_process_group()
        except Exception:  # a dead peer must not turn a clean exit into a traceback
            pass


def is_initialized() -> bool:
    return tdist.is_available() and tdist.is_initialized()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over ranks, in place (a no-op with one process)."""
    if is_initialized():
        tdist.all_reduce(t, op=tdist.ReduceOp.SUM)
    return t


def all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    if is_initialized():
        tdist.all_reduce(t, op=tdist.ReduceOp.AVG if t.is_cuda else tdist.ReduceOp.SUM)
        if not t.is_cuda:
            t /= tdist.get_world_size()
    return t


def all_reduce_max(t: torch.Tensor) -> torch.Tensor:
    if is_initialized():
        tdist.all_reduce(t, op=tdist.ReduceOp.MAX)
    return t


def barrier() -> None:
    if is_initialized():
        tdist.barrier()


# ----------------------------------------------------------------------------- rank-0-only work
# Work that only rank 0 does (--eval-tasks, writing a single-file checkpoint) may take longer than
# --dist-timeout: the other ranks wait for it through the process group's store, not in a
# collective. Rank 0 sets a key when done ("ok") or failed ("error"), and bumps a pulse counter
# while it works; a waiting rank feeds its stall watchdog only while that pulse moves, so a rank 0
# stopped by the OS still ends the job (the watchdog of rank 0 itself is paused for its section).

_sections: dict[str, int] = {}
PULSE_S = 1.0


class Rank0Failed(PeerFailure):
    """Raised on the waiting ranks when rank 0's work failed (rank 0 reports the cause, unless it
    was killed or stopped first)."""


class Rank0Timeout(PeerFailure, TimeoutError):
    """Raised on a waiting rank when rank 0's work took longer than the wait's own timeout."""


_namespace: tuple[object, str] | None = None  # (the process group, its key prefix)
_generation = 0  # process groups this process has used sections with (the same count on every rank)


def _section_key(name: str) -> str:
    """The store key of the next section called `name`: the same on every rank (they enter the
    sections in the same order), and new for each process group. A store can outlive its workers
    (torchrun's agent keeps one over restarts), so the keys name the restart attempt: a key set by
    an earlier attempt never ends a wait."""
    global _namespace, _generation
    from torch.distributed import distributed_c10d

    group = distributed_c10d._get_default_group()
    if _namespace is None or _namespace[0] is not group:
        _generation += 1
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        _namespace = (group, f"{os.environ.get('TORCHELASTIC_RUN_ID', '')}/{attempt}/{_generation}")
        _sections.clear()
    n = _sections[name] = _sections.get(name, 0) + 1
    return f"gptlab/rank0/{_namespace[1]}/{name}/{n}"


def _store():
    from torch.distributed import distributed_c10d

    return distributed_c10d._get_default_store()


def signal_rank0_done(name: str, key: str, ok: bool) -> None:
    """Rank 0: tell the waiting ranks that section `key` ended (failed unless ok)."""
    _store().set(key, b"ok" if ok else b"error")


def wait_for_rank0(name: str, key: str | None = None, timeout: float | None = None, max_poll_s: float = 0.5) -> None:
    """A rank other than 0: wait until rank 0 has signalled the end of section `key` (the next
    section called `name` when None), polling the store, so the wait never counts against the
    collective timeout. Feeds the stall watchdog while rank 0's pulse moves. Raises Rank0Failed when
    rank 0 failed, Rank0Timeout after `timeout` seconds (None: no limit but the watchdog's)."""
    from gptlab import watchdog

    key = key or _section_key(name)
    store, t0, poll, pulse = _store(), time.monotonic(), 0.002, -1
    while not store.check([key]):
        seen = store.add(key + "/pulse", 0)
        if seen != pulse:
            pulse = seen
            watchdog.beat()  # rank 0 is alive and working: not a stall
        if timeout is not None and time.monotonic() - t0 > timeout:
            raise Rank0Timeout(f"rank 0 did not finish {name} in {timeout:g} s")
        time.sleep(poll)
        poll = min(max_poll_s, poll * 2)
    watchdog.beat()
    if store.get(key) != b"ok":
        if os.environ.get(LAUNCH_DIR_ENV):  # let rank 0's one-line report arrive first (cli: then quiet)
            deadline = time.monotonic() + 5
            while not peer_reported_error() and time.monotonic() < deadline:
                time.sleep(0.05)
        raise Rank0Failed(f"rank 0 failed during {name} and reported no error of its own (was it killed or "
                          f"stopped?)")


def rank0_only(name: str, work: Callable[[], T], timeout: float | None = None) -> T | None:
    """Run work() on rank 0 while the other ranks wait for it outside any collective (see above);
    returns its result on rank 0, None elsewhere. Collective in the sense that every rank calls it,
    in the same order. With one process, simply work()."""
    if not is_initialized():
        return work()
    from gptlab import watchdog

    key = _section_key(name)
    if tdist.get_rank() != 0:
        wait_for_rank0(name, key, timeout)
        return None
    store, done = _store(), threading.Event()

    def pulse() -> None:
        while not done.wait(PULSE_S):
            try:
                store.add(key + "/pulse", 1)
            except Exception:  # the store is gone: the job is ending anyway
                return

    beat = threading.Thread(target=pulse, name="gptlab-rank0-pulse", daemon=True)
    beat.start()
    ok = False
    try:
        with watchdog.paused():
            result = work()
        ok = True
        return result
    finally:
        done.set()
        beat.join()
        signal_rank0_done(name, key, ok)


def strip_flag(argv: list[str], flag: str) -> list[str]:
    """argv without `flag VALUE` / `flag=VALUE`."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a == flag:
            skip = True
            continue
        if a.startswith(flag + "="):
            continue
        out.append(a)
    return out


def resolve_nproc(nproc: str) -> int:
    if nproc == "auto":
        return max(1, torch.cuda.device_count()) if torch.cuda.is_available() else 1
    try:
        n = int(nproc)
    except ValueError:
        raise UserError(f"--nproc must be 'auto' or a positive integer, got {nproc!r}") from None
    if n < 1:
        raise UserError(f"--nproc must be 'auto' or a positive integer, got {nproc!r}")
    return n


def needs_launch(n: int) -> bool:
    """True when `--nproc n` asks for more processes than this one and torchrun has not started us."""
    return n > 1 and "RANK" not in os.environ


LAUNCH_DIR_ENV = "GPTLAB_LAUNCH_DIR"  # set by self_launch for its workers: where they report a UserError
SHUTDOWN_TIMEOUT_S = 120  # how long torchrun lets workers save after passing on a signal (torch's own: 30)
_ELASTIC_LOGGERS = ("torch.distributed.run", "torch.distributed.launcher", "torch.distributed.elastic")
_AGENT_LOGGER = "torch.distributed.elastic.agent.server.api"  # the one that announces restarts


def report_error(line: str) -> None:
    """Show a user's mistake (`line`, one line) once for the whole job. One process: on stderr.
    A worker of self_launch: written to the launch directory, which the launcher prints once.
    A worker of a user's own torchrun: on stderr from rank 0 only (every rank exits alike)."""
    rank = os.environ.get("RANK")
    where = os.environ.get(LAUNCH_DIR_ENV)
    if rank is not None and where:
        path = os.path.join(where, f"error.{_attempt()}.{rank}")
        try:
            write_text(path, line)  # whole or absent: the launcher never reads half a line
            return
        except OSError:
            pass  # the launcher is gone or its directory unwritable: say it here
    if rank is None or rank == "0" or where:
        print(line, file=sys.stderr, flush=True)


def _attempt() -> int:
    """Which start of the worker group this process belongs to: 0, then 1, 2, ... after each
    restart (torchrun's TORCHELASTIC_RESTART_COUNT)."""
    try:
        return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    except ValueError:
        return 0


def _reported(where: str) -> dict[int, list[str]]:
    """The error files in a launch directory, by attempt: error.ATTEMPT.RANK."""
    found: dict[int, list[str]] = {}
    try:
        names = os.listdir(where)
    except OSError:
        return found
    for name in names:
        parts = name.split(".")
        if len(parts) == 3 and parts[0] == "error" and parts[1].isdigit() and parts[2].isdigit():
            found.setdefault(int(parts[1]), []).append(name)
    return found


def peer_reported_error() -> bool:
    """Under self_launch: whether some worker of this attempt has already reported a UserError (the
    failures of the other workers that follow, such as a collective whose peer left, are not news).
    An earlier attempt's report is not: a restarted group speaks of its own failures."""
    where = os.environ.get(LAUNCH_DIR_ENV)
    return bool(where and _reported(where).get(_attempt()))


def _first_error(where: str, attempt: int | None = None) -> str | None:
    """The line to show for a launch: from `attempt`'s reports (None: the latest attempt that made
    one), rank 0's when it reported one (the rank that prints under a user's own torchrun, and the
    one that holds the real cause when the others only learn of a failure through a collective),
    else the first reported, by time (later ones are consequences)."""
    reported = _reported(where)
    if attempt is None:
        attempt = max(reported, default=0)
    found = []
    for name in reported.get(attempt, []):
        path = os.path.join(where, name)
        try:
            with open(path, encoding="utf-8") as f:
                line = f.read().strip()
            found.append((not name.endswith(".0"), os.stat(path).st_mtime_ns, name, line))
        except OSError:
            continue
    return min(found)[3] if found else None


class _Restarts(logging.Handler):
    """Says in one line when torchrun restarts the worker group, and why: the error a worker
    reported for the attempt that failed, else that one exited or was killed (its output is above).
    Without it a restart is silent."""

    def __init__(self, command: str, where: str) -> None:
        super().__init__(logging.INFO)
        self.command, self.where = command, where

    def emit(self, record: logging.LogRecord) -> None:
        if "will restart worker group" not in str(record.msg) or len(record.args or ()) != 4:
            return
        left, most = int(record.args[2]), int(record.args[3])
        attempt = most - left  # the attempt that failed: 0 first
        line = _first_error(self.where, attempt)
        prefix = f"gptlab {self.command}: "
        why = line[len(prefix):] if line and line.startswith(prefix) else line
        why = why or "a worker exited or was killed (its output is above)"
        print(f"{prefix}restarting the workers (restart {attempt + 1} of {most}) after: {why}",
              file=sys.stderr, flush=True)


class _Held(logging.Handler):
    """Keeps torchrun's own log records back: they are shown only when a launch fails for a
    reason gptlab cannot put in one line."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def replay(self) -> None:
        for r in self.records:
            print(f"torchrun: {r.levelname.lower()}: {r.getMessage()}", file=sys.stderr)


def self_launch(n: int, argv: list[str], command: str = "train", max_restarts: int = 0) -> int:
    """`gptlab train --nproc N ...`: run `python -m gptlab` with the same arguments (without
    --nproc) as N worker processes on this node, through torchrun's launcher (its agent runs in
    this process). When a worker fails, torchrun stops the others and starts the group again, up to
    `max_restarts` times (with --resume auto each start continues from the latest checkpoint).
    After passing on a signal, torchrun waits TORCH_ELASTIC_SHUTDOWN_TIMEOUT seconds (default here
    SHUTDOWN_TIMEOUT_S) for the workers' save before it kills them.
    Returns the exit status for the whole job:
    - 0 when every worker finished;
    - 2 when a worker stopped on a UserError (in the last attempt, once restarts are spent): the
      first line reported is printed once, with no torchrun traceback or failure summary (the
      workers report through LAUNCH_DIR_ENV, keyed by attempt);
    - 128 + the signal after SIGTERM/SIGINT/SIGHUP here: torchrun sends it to every worker, they
      save at the step boundary and exit, rank 0 saying how to continue (143 after SIGTERM, as a
      single process);
    - 1 when a worker failed otherwise (its own traceback is above): which rank, with what code.
    The CLI is not imported here: the workers parse argv themselves."""
    import tempfile

    from torch.distributed import run as torchrun
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    rest = strip_flag(strip_flag(argv, "--nproc"), "--max-restarts")  # the launcher's, not the workers
    shutdown_s = os.environ.get("TORCH_ELASTIC_SHUTDOWN_TIMEOUT") or str(SHUTDOWN_TIMEOUT_S)
    targs = ["--standalone", f"--nproc_per_node={n}", f"--max-restarts={max_restarts}",
             f"--shutdown-timeout={shutdown_s}", "-m", "gptlab", *rest]
    print(f"gptlab: launching {n} processes: torchrun {' '.join(targs)}", file=sys.stderr, flush=True)
    previous = os.environ.get(LAUNCH_DIR_ENV)
    with tempfile.TemporaryDirectory(prefix="gptlab-launch-") as where:
        held, restarts = _Held(), _Restarts(command, where)
        saved = []
        for name in _ELASTIC_LOGGERS:
            log = logging.getLogger(name)
            saved.append((log, log.propagate))
            log.addHandler(held)
            log.addHandler(restarts)
            log.propagate = False
        agent = logging.getLogger(_AGENT_LOGGER)
        agent_level = agent.level
        agent.setLevel(logging.INFO)  # its restart notice is an INFO record
        os.environ[LAUNCH_DIR_ENV] = where  # the workers inherit it
        try:
            torchrun.run(torchrun.parse_args(targs))
            return 0
        except SignalException as e:
            line = _first_error(where)  # e.g. the save the signal asked for found the disk full
            if line is not None:
                print(line, file=sys.stderr, flush=True)
                return 2
            return 128 + int(e.sigval)
        except ChildFailedError as e:
            line = _first_error(where, max_restarts)  # the group fails once its restarts are spent
            if line is not None:
                print(line, file=sys.stderr, flush=True)
                return 2
            for rank, failure in sorted(e.failures.items()):
                code = failure.exitcode
                how = (f"was killed by {signal.Signals(-code).name}" if code < 0 and -code in signal.valid_signals()
                       else f"exited with status {code}")
                print(f"gptlab {command}: worker rank {rank} {how} (its output is above)", file=sys.stderr)
            return 1
        except KeyboardInterrupt:  # Ctrl-C before the workers started: the CLI says "interrupted"
            raise
        except BaseException:
            held.replay()  # torchrun's own account of what went wrong
            raise
        finally:
            for log, propagate in saved:
                log.removeHandler(held)
                log.removeHandler(restarts)
                log.propagate = propagate
            agent.setLevel(agent_level)
            if previous is None:
                os.environ.pop(LAUNCH_DIR_ENV, None)
            else:
                os.environ[LAUNCH_DIR_ENV] = previous
