"""The engine seam: every optimisation step of every stage goes through an Engine.

A stage hands the engine its parameter groups (each with an ``lr_mult``) and the phase's
OptimConfig; the engine owns the optimizer and the schedule and does backward + clip + step.
Today there is one implementation, plain PyTorch on one process; a DeepSpeed engine slots in
here without touching the stages.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

from ..config import OptimConfig


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
    """SGD or AdamW over ``groups`` (each ``{"params": [...], "lr_mult": float}``)."""
    torch_groups = [
        {"params": g["params"], "lr": o.lr * g.get("lr_mult", 1.0),
         "weight_decay": g.get("weight_decay", o.weight_decay)}
        for g in groups
    ]
    if o.name == "sgd":
        return torch.optim.SGD(torch_groups, lr=o.lr, momentum=o.momentum,
                               nesterov=o.nesterov and o.momentum > 0)
    if o.name == "adamw":
        return torch.optim.AdamW(torch_groups, lr=o.lr, betas=tuple(o.betas))
    raise ValueError(f"unknown optimizer {o.name!r}")


class TorchEngine:
    """Optimizer + schedule + gradient clipping for one phase, on one process."""

    def __init__(self, groups: list[dict], optim: OptimConfig, total_steps: int):
        groups = [g for g in groups if g["params"] and g.get("lr_mult", 1.0) > 0]
        if not groups:
            raise ValueError("nothing to train: every parameter group is empty or frozen")
        self.params = [p for g in groups for p in g["params"]]
        self.optim_cfg = optim
        self.optimizer = build_optimizer(groups, optim)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: lr_factor(step, total_steps, optim)
        )

    @property
    def lr(self) -> float:
        """The current lr of the first group (the part of the net being trained at full rate)."""
        return self.optimizer.param_groups[0]["lr"]

    def step(self, loss: torch.Tensor) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.optim_cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.params, self.optim_cfg.grad_clip)
        self.optimizer.step()
        self.scheduler.step()

    def state_dict(self) -> dict:
        return {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])


def make_engine(groups: Iterable[dict], optim: OptimConfig, total_steps: int) -> TorchEngine:
    """The engine for one phase; the only place that decides which implementation runs."""
    return TorchEngine(list(groups), optim, total_steps)
