"""Parameter groups, the optimizers (AdamW, or Muon beside AdamW) and learning-rate schedules.

A run holds a list of optimizers: [AdamW] for the GPT-3 recipe, or [AdamW, Muon] for `muon`, where
Muon (torch.optim.Muon's update, its work shared over the ranks: gptlab.muon) takes every 2-D weight
inside the blocks and AdamW the embeddings (the tied head) and every 1-D parameter. Each param group
remembers its own peak lr ("peak_lr"); the schedule is a factor in [0, 1] applied to every group's
peak, so warm-up and decay shape both optimizers alike.
"""

from __future__ import annotations

import inspect
import math
from typing import Iterable, Sequence

import torch

from gptlab import dist
from gptlab.errors import UserError
from gptlab.muon import Muon
from gptlab.runtime import native_bf16_matmul

SCHEDULES = ("cosine", "linear", "constant", "wsd")
OPTIMIZERS = ("adamw", "muon")


def _decay_split(params: Iterable[torch.nn.Parameter], weight_decay: float) -> list[dict]:
    """Decay 2-D weights (matmuls and embeddings); never biases or LayerNorm gains."""
    decay, no_decay = [], []
    for p in params:
        (decay if p.dim() >= 2 else no_decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def _unique_params(model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    """(name, parameter) once each (the tied head appears once, as the embedding), trainable only."""
    seen, out = set(), []
    for name, p in model.named_parameters():
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            out.append((name, p))
    return out


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """AdamW's groups for the whole model: decay on 2-D weights only."""
    return _decay_split((p for _, p in _unique_params(model)), weight_decay)


def muon_split(model: torch.nn.Module) -> tuple[list[torch.nn.Parameter], list[torch.nn.Parameter]]:
    """(Muon's parameters, AdamW's): Muon takes the 2-D weights inside the blocks (attention and
    MLP matrices); the embeddings, the tied head and every bias or gain stay with AdamW."""
    muon, rest = [], []
    for name, p in _unique_params(model):
        in_block = ".h." in f".{name}"  # transformer.h.<i>.… (also under _orig_mod. / module.)
        (muon if in_block and p.dim() == 2 else rest).append(p)
    return muon, rest


FUSED_ADAMW_DEVICES = ("cuda", "cpu")


def _adamw_kwargs(device_type: str) -> dict:
    """Fused AdamW where torch has it for the device: CUDA, and the CPU, where one pass over each
    parameter, its gradient and moments replaces a dozen (the same update; 0.5 s instead of 2.5-3.4 s
    an AdamW step at 124M on a 2-core CPU). torch's default implementation elsewhere."""
    if device_type in FUSED_ADAMW_DEVICES and "fused" in inspect.signature(torch.optim.AdamW).parameters:
        return {"fused": True}
    return {}


def _with_peak(opt: torch.optim.Optimizer) -> torch.optim.Optimizer:
    for g in opt.param_groups:
        g["peak_lr"] = g["lr"]
    return opt


def make_adamw(model: torch.nn.Module, *, lr: float, weight_decay: float, betas: tuple[float, float],
               eps: float, device_type: str) -> torch.optim.AdamW:
    """AdamW over the whole model (the GPT-3 recipe)."""
    opt = torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, betas=betas, eps=eps,
                            **_adamw_kwargs(device_type))
    return _with_peak(opt)


def make_optimizers(model: torch.nn.Module, cfg, device_type: str) -> list[torch.optim.Optimizer]:
    """The optimizers that `cfg` (a TrainConfig) names: [AdamW] or [AdamW, Muon]."""
    adamw_kw = dict(lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, **_adamw_kwargs(device_type))
    if cfg.optimizer == "adamw":
        return [make_adamw(model, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(cfg.beta1, cfg.beta2),
                           eps=cfg.eps, device_type=device_type)]
    if cfg.optimizer != "muon":
        raise UserError(f"unknown optimizer {cfg.optimizer!r}; choose one of {', '.join(OPTIMIZERS)}")
    hidden, rest = muon_split(model)
    adamw = torch.optim.AdamW(_decay_split(rest, cfg.weight_decay), **adamw_kw)
    # adjust_lr_fn="original": the update of a (rows x cols) matrix is scaled by sqrt(max(1, rows/cols)),
    # Keller Jordan's Muon, whose lr (0.02) is not on AdamW's scale
    # shared: in a process group (DDP) each rank orthogonalises its share of the matrices (gptlab.muon);
    # FSDP's DTensors are shared over their mesh whatever this says
    muon = Muon(hidden, lr=cfg.muon_lr, momentum=cfg.muon_momentum, nesterov=True,
                weight_decay=cfg.muon_weight_decay, adjust_lr_fn="original",
                ns_fp32=not native_bf16_matmul(device_type), shared=dist.is_initialized())
    return [_with_peak(adamw), _with_peak(muon)]


def lr_at(step: int, *, schedule: str, max_lr: float, total_steps: int, warmup_steps: int,
          min_lr_ratio: float = 0.1, decay_frac: float = 0.2) -> float:
    """Learning rate for optimizer step `step` (0-based).

    cosine:   linear warm-up, then cosine from max_lr down to min_lr_ratio * max_lr at total_steps.
    linear:   linear warm-up, then linear decay to min_lr_ratio * max_lr.
    constant: linear warm-up, then max_lr.
    wsd:      warm-up, stable at max_lr, then linear decay over the last decay_frac of the steps.
    """
    min_lr = max_lr * min_lr_ratio
    if warmup_steps > 0 and step < warmup_steps:
        return max_lr * (step + 1) / warmup_steps
    if schedule == "constant":
        return max_lr
    if step >= total_steps:
        return min_lr
    if schedule == "cosine":
        span = max(1, total_steps - warmup_steps)
        ratio = (step - warmup_steps) / span
        return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (max_lr - min_lr)
    if schedule == "linear":
        span = max(1, total_steps - warmup_steps)
        ratio = (step - warmup_steps) / span
        return max_lr - ratio * (max_lr - min_lr)
    if schedule == "wsd":
        decay_steps = max(1, int(round(total_steps * decay_frac)))
        decay_start = total_steps - decay_steps
        if step < decay_start:
            return max_lr
        ratio = (step - decay_start) / decay_steps
        return max_lr - ratio * (max_lr - min_lr)
    raise UserError(f"unknown schedule {schedule!r}; choose one of {', '.join(SCHEDULES)}")


def as_list(optimizers: torch.optim.Optimizer | Sequence[torch.optim.Optimizer] | None) -> list[torch.optim.Optimizer]:
    """One optimizer, several (Muon's pair) or none, as a list."""
    if optimizers is None:
        return []
    return [optimizers] if isinstance(optimizers, torch.optim.Optimizer) else list(optimizers)


def set_lr(optimizers: torch.optim.Optimizer | Sequence[torch.optim.Optimizer], lr: float) -> None:
    """Every group's lr to `lr` (one optimizer, one peak)."""
    for opt in as_list(optimizers):
        for group in opt.param_groups:
            group["lr"] = lr


def scale_lr(optimizers: torch.optim.Optimizer | Sequence[torch.optim.Optimizer], factor: float) -> None:
    """Every group's lr to factor x its own peak: the schedule's shape, on each optimizer's scale."""
    for opt in as_list(optimizers):
        for group in opt.param_groups:
            group["lr"] = group["peak_lr"] * factor
