"""Everything distributed: torchrun's environment, the process group,
reductions, and self-launch through torchrun. Other modules ask `env.is_main` or `env.world_size`.
"""

from __future__ import annotations

import datetime
import os
import sys
from dataclasses import dataclass

import torch
import torch.distributed as tdist

from gptlab.errors import UserError


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
        tdist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s), **kwargs)
    return env


def shutdown() -> None:
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


def self_launch(n: int, argv: list[str]) -> None:
    """`gptlab train --nproc N ...`: re-execute `python -m gptlab` with the same arguments (without
    --nproc) under torchrun with N processes on this node. The process is replaced, so signals
    reach torchrun directly. The CLI is not imported here: the new processes parse argv themselves."""
    rest = strip_flag(argv, "--nproc")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}",
           "-m", "gptlab", *rest]
    print(f"gptlab: launching {n} processes: {' '.join(cmd[1:])}", file=sys.stderr, flush=True)
    os.execv(sys.executable, cmd)
