"""Everything distributed: torchrun's environment, the process group, rank-0 printing,
reductions, and self-launch through torchrun. Other modules ask `env.is_main` or `env.world_size`.
"""

from __future__ import annotations

import datetime
import os
import sys
from dataclasses import dataclass

import torch
import torch.distributed as tdist


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


_ENV = DistEnv()


def get_env() -> DistEnv:
    return _ENV


def init(device_type: str = "cpu", timeout_s: float = 600.0) -> DistEnv:
    """Start the process group when launched by torchrun: nccl on CUDA, gloo otherwise.
    The timeout makes surviving ranks fail instead of hanging when one dies."""
    global _ENV
    env = env_from_torchrun()
    if env.is_distributed and not tdist.is_initialized():
        backend = "nccl" if device_type == "cuda" else "gloo"
        kwargs = {}
        if device_type == "cuda":
            torch.cuda.set_device(env.local_rank)
            kwargs["device_id"] = torch.device("cuda", env.local_rank)
        tdist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s), **kwargs)
    _ENV = env
    return env


def shutdown() -> None:
    global _ENV
    if tdist.is_initialized():
        try:
            tdist.destroy_process_group()
        except Exception:  # a dead peer must not turn a clean exit into a traceback
            pass
    _ENV = DistEnv()


def is_initialized() -> bool:
    return tdist.is_available() and tdist.is_initialized()


def print0(*args, **kwargs) -> None:
    """print on rank 0 only."""
    if _ENV.is_main:
        print(*args, **kwargs)


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


def broadcast_object(obj, src: int = 0):
    if not is_initialized():
        return obj
    box = [obj]
    tdist.broadcast_object_list(box, src=src)
    return box[0]


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
    from gptlab.errors import UserError

    if nproc == "auto":
        return max(1, torch.cuda.device_count()) if torch.cuda.is_available() else 1
    try:
        n = int(nproc)
    except ValueError:
        raise UserError(f"--nproc must be 'auto' or a positive integer, got {nproc!r}") from None
    if n < 1:
        raise UserError(f"--nproc must be 'auto' or a positive integer, got {nproc!r}")
    return n


def self_launch(nproc: str, argv: list[str]) -> int:
    """`gptlab train --nproc N ...`: run the same command under torchrun with N processes on this
    node (the process is replaced, so signals reach torchrun directly). Under torchrun already,
    or with N = 1, train in this process."""
    n = resolve_nproc(nproc)
    rest = strip_flag(argv, "--nproc")
    if "RANK" in os.environ or n == 1:
        from gptlab.cli import main

        return main(rest)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}",
           "-m", "gptlab", *rest]
    print(f"gptlab: launching {n} processes: {' '.join(cmd[1:])}", file=sys.stderr, flush=True)
    os.execv(sys.executable, cmd)
    return 0  # not reached
