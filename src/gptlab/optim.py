"""Parameter groups, AdamW and learning-rate schedules."""

from __future__ import annotations

import inspect
import math

import torch

from gptlab.errors import UserError

SCHEDULES = ("cosine", "linear", "constant", "wsd")


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Decay 2-D weights (matmuls and embeddings); never biases or LayerNorm gains."""
    decay, no_decay = [], []
    seen = set()
    for _, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:  # the tied head appears once
            continue
        seen.add(id(p))
        (decay if p.dim() >= 2 else no_decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def make_adamw(model: torch.nn.Module, *, lr: float, weight_decay: float, betas: tuple[float, float],
               eps: float, device_type: str) -> torch.optim.AdamW:
    """AdamW, fused where the device supports it (CUDA); the foreach path elsewhere."""
    kwargs = {}
    if device_type == "cuda" and "fused" in inspect.signature(torch.optim.AdamW).parameters:
        kwargs["fused"] = True
    return torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, betas=betas, eps=eps, **kwargs)


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


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
