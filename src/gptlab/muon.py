"""Muon for the blocks' matrices: torch.optim.Muon's update and state, its Newton-Schulz iteration
in float32 where bf16 matmuls are emulated, and that iteration shared over the ranks of a run.

Sharing (the idea of modded-nanogpt's distributed Muon, written anew here). The matrices of a param
group are grouped by shape, and within a shape the j-th matrix belongs to rank j mod N. A rank
orthogonalises its own matrices only, so each rank's Newton-Schulz work falls as 1/N:
- replicated parameters (DDP: every rank holds the same weights and, after the all-reduce, the same
  gradients): each rank orthogonalises its share, and one all_gather for every N matrices of a shape
  hands every rank all N results;
- row-sharded parameters (FSDP2's DTensors, Shard(0)): one all_to_all brings the owner of each matrix
  the other ranks' rows of its momentum-updated gradient, the owner orthogonalises the whole matrix,
  and a second all_to_all sends every rank its rows of the result.
Momentum buffers live where the gradients do (replicated under DDP, sharded like the parameter under
FSDP), so the state dict is torch's own and checkpoints (single-file or DCP) need nothing new.
"""

from __future__ import annotations

import math
import time

import torch
import torch.distributed as tdist


def newton_schulz(grad: torch.Tensor, ns_coefficients: tuple[float, float, float], ns_steps: int, eps: float,
                  dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """torch.optim.Muon's quintic Newton-Schulz orthogonalisation of a 2-D matrix, in `dtype` (torch's
    own runs it in bfloat16)."""
    a, b, c = ns_coefficients
    x = grad.to(dtype)
    tall = x.size(0) > x.size(1)
    if tall:
        x = x.T  # (small, large): the Gram matrix is the small side squared
    x = x / x.norm().clamp(min=eps)  # spectral norm at most 1
    for _ in range(ns_steps):
        gram = x @ x.T
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.T if tall else x


def adjusted_lr(lr: float, adjust_lr_fn: str | None, shape: torch.Size) -> float:
    """torch.optim.Muon's learning rate for a (rows x cols) matrix (`shape` is the whole matrix's)."""
    rows, cols = shape[:2]
    if adjust_lr_fn in (None, "original"):
        return lr * math.sqrt(max(1, rows / cols))
    if adjust_lr_fn == "match_rms_adamw":
        return lr * 0.2 * math.sqrt(max(rows, cols))
    return lr


def _local(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's local shard (sharing its storage: written in place under no_grad), else t."""
    return t.to_local() if hasattr(t, "to_local") else t


class Muon(torch.optim.Muon):
    """torch.optim.Muon's update (momentum, Nesterov, Newton-Schulz, the lr adjustment, decoupled weight
    decay) and state dict, with two changes. `ns_fp32`: the Newton-Schulz iteration runs in float32,
    not bfloat16 (where bf16 matmuls are emulated, most CPUs, bf16 is about 300x slower). `shared`:
    the parameters are the same on every rank of the default process group (DDP), and the iteration
    is shared over the ranks (see the module's docstring). DTensor parameters (FSDP) are always shared,
    over their mesh. `ns_matrices` and `ns_seconds` count this rank's Newton-Schulz work in the last
    step (host seconds: on a GPU, without a synchronize, only the time to launch it)."""

    def __init__(self, params, *, ns_fp32: bool = False, shared: bool = False, **kwargs) -> None:
        super().__init__(params, **kwargs)
        self.ns_fp32 = ns_fp32
        self.shared = shared
        self.ns_matrices = 0
        self.ns_seconds = 0.0

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.ns_matrices, self.ns_seconds = 0, 0.0
        for group in self.param_groups:
            params: list[torch.Tensor] = []
            grads: list[torch.Tensor] = []
            bufs: list[torch.Tensor] = []
            self._init_group(group, params, grads, bufs)  # torch's: momentum_buffer = zeros_like(grad)
            momentum = group["momentum"]
            updates = []
            for g, buf in zip(grads, bufs):
                g, buf = _local(g), _local(buf)
                buf.lerp_(g, 1 - momentum)
                updates.append(g.lerp(buf, momentum) if group["nesterov"] else buf)
            ortho = self._orthogonalise(group, params, updates)
            lr, wd = group["lr"], group["weight_decay"]
            for p, o in zip(params, ortho):
                w = _local(p)
                w.mul_(1 - lr * wd)
                w.add_(o, alpha=-adjusted_lr(lr, group["adjust_lr_fn"], p.shape))
        return loss

    def _ns(self, group: dict, x: torch.Tensor) -> torch.Tensor:
        t0 = time.perf_counter()
        out = newton_schulz(x, group["ns_coefficients"], group["ns_steps"], group["eps"], self._ns_dtype)
        self.ns_seconds += time.perf_counter() - t0
        self.ns_matrices += 1
        return out

    @property
    def _ns_dtype(self) -> torch.dtype:
        return torch.float32 if self.ns_fp32 else torch.bfloat16

    def _orthogonalise(self, group: dict, params: list[torch.Tensor], updates: list[torch.Tensor]) -> list:
        """Each parameter's orthogonalised update (this rank's rows of it, for a DTensor)."""
        sharded = bool(params) and hasattr(params[0], "device_mesh")
        pg, rank, n = self._ranks(params[0] if sharded else None)
        if n == 1:
            return [self._ns(group, u) for u in updates]
        out: list = [None] * len(params)
        shapes: dict[tuple, list[int]] = {}
        for i, p in enumerate(params):
            shapes.setdefault((tuple(p.shape), p.dtype), []).append(i)
        chunks = [idx[s:s + n] for idx in shapes.values() for s in range(0, len(idx), n)]
        if sharded:
            self._sharded(group, chunks, params, updates, out, pg, rank, n)
        else:
            self._replicated(group, chunks, updates, out, pg, rank, n)
        return out

    def _ranks(self, dtensor: torch.Tensor | None) -> tuple:
        """(process group, this rank in it, its size) that the iteration is shared over."""
        if dtensor is not None:
            mesh = dtensor.device_mesh
            if mesh.ndim != 1 or not all(pl.is_shard(0) for pl in dtensor.placements):
                raise ValueError(f"Muon shares DTensors sharded on dim 0 of a 1-D mesh, not {dtensor.placements}")
            return mesh.get_group(), mesh.get_local_rank(), mesh.size()
        if self.shared and tdist.is_available() and tdist.is_initialized():
            return None, tdist.get_rank(), tdist.get_world_size()
        return None, 0, 1

    def _replicated(self, group, chunks, updates, out, pg, rank, n) -> None:
        """Every rank has every whole update: rank r orthogonalises the r-th matrix of each chunk of
        n same-shaped ones (zeros where a chunk is short), and one all_gather a chunk shares them."""
        pending = []
        for chunk in chunks:
            if rank < len(chunk):
                mine = self._ns(group, updates[chunk[rank]])
            else:
                mine = torch.zeros(updates[chunk[0]].shape, dtype=self._ns_dtype, device=updates[chunk[0]].device)
            gathered = [torch.empty_like(mine) for _ in range(n)]
            pending.append((tdist.all_gather(gathered, mine, group=pg, async_op=True), chunk, gathered))
        for work, chunk, gathered in pending:
            work.wait()
            for j, i in enumerate(chunk):
                out[i] = gathered[j]

    def _sharded(self, group, chunks, params, updates, out, pg, rank, n) -> None:
        """Each rank has its rows of every update (FSDP2 splits dim 0 as torch.chunk does: ceil(rows/n)
        rows a rank, the last ones fewer or none). Per chunk of n same-shaped matrices: all_to_all
        gives rank r every rank's rows of the chunk's r-th matrix, r orthogonalises it whole, and a
        second all_to_all hands each rank its rows of every result. Blocks are padded to ceil(rows/n)."""
        inbound = []
        for chunk in chunks:  # every gather in flight before the first orthogonalisation
            rows, cols = params[chunk[0]].shape
            c = -(-rows // n)
            u0 = updates[chunk[0]]
            send = u0.new_zeros(n, c, cols)  # block j: my rows of the chunk's j-th matrix, for its owner j
            for j, i in enumerate(chunk):
                send[j, :updates[i].size(0)] = updates[i]
            recv = torch.empty_like(send)  # block s: rank s's rows of my matrix
            inbound.append((tdist.all_to_all_single(recv, send, group=pg, async_op=True), recv))
        outbound = []
        for chunk, (work, recv) in zip(chunks, inbound):
            rows, cols = params[chunk[0]].shape
            c = recv.size(1)
            sizes = [max(0, min(c, rows - s * c)) for s in range(n)]
            send = recv.new_zeros(n, c, cols, dtype=self._ns_dtype)
            work.wait()
            if rank < len(chunk):
                full = self._ns(group, torch.cat([recv[s, :sizes[s]] for s in range(n)]))  # (rows, cols)
                for s in range(n):
                    send[s, :sizes[s]] = full[s * c: s * c + sizes[s]]
            back = torch.empty_like(send)  # block j: my rows of the chunk's j-th result
            outbound.append((tdist.all_to_all_single(back, send, group=pg, async_op=True), chunk, back))
        for work, chunk, back in outbound:
            work.wait()
            for j, i in enumerate(chunk):
                out[i] = back[j, :updates[i].size(0)]
