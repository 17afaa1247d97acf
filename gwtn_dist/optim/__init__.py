"""The optimizer and the learning-rate schedule of a training phase.

Both engines (``distributed.engines``) build a phase's optimizer and schedule here, so a
one-process run and a DeepSpeed run step the same optimizer along the same schedule; the
step benchmark builds its bare-PyTorch baseline from the same function. Nothing here imports
DeepSpeed.
"""

from __future__ import annotations

import math

import torch

from ..config.schema import OptimConfig
from .lamb import make_lamb


def lr_factor(step: int, total: int, o: OptimConfig) -> float:
    """Multiplier of the base lr at ``step`` (0-based) of a phase of ``total`` steps."""
    if o.warmup_steps and step < o.warmup_steps:
        return (step + 1) / o.warmup_steps
    done = step - o.warmup_steps
    span = max(1, total - o.warmup_steps)
    if o.schedule == "cosine":
        cos = 0.5 * (1 + math.cos(math.pi * min(done, span) / span))
        return o.min_lr_ratio + (1 - o.min_lr_ratio) * cos
    if o.schedule == "multistep":
        passed = sum(1 for m in o.milestones if step >= m * total)
        return o.gamma**passed
    return 1.0


def build_optimizer(groups: list[dict], o: OptimConfig) -> torch.optim.Optimizer:
    """SGD, AdamW (fused on CUDA) or LAMB over ``groups`` (each ``{"params": [...],
    "lr_mult": float}``)."""
    torch_groups = [
        {"params": g["params"], "lr": o.lr * g.get("lr_mult", 1.0),
         "weight_decay": g.get("weight_decay", o.weight_decay)}
        for g in groups
    ]
    if o.name == "sgd":
        return torch.optim.SGD(torch_groups, lr=o.lr, momentum=o.momentum,
                               nesterov=o.nesterov and o.momentum > 0)
    if o.name == "adamw":
        # One fused kernel for the whole update when every parameter is on a GPU.
        on_cuda = all(p.is_cuda for g in groups for p in g["params"])
        return torch.optim.AdamW(torch_groups, lr=o.lr, betas=tuple(o.betas),
                                 fused=True if on_cuda else None)
    if o.name == "lamb":
        return make_lamb(torch_groups, o.lr, tuple(o.betas))
    raise ValueError(f"unknown optimizer {o.name!r}")


def schedule(optimizer: torch.optim.Optimizer, total_steps: int,
             o: OptimConfig) -> torch.optim.lr_scheduler.LambdaLR:
    """The phase's schedule on ``optimizer``: the base lr times ``lr_factor`` at each step."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, total_steps, o))
