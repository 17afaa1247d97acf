"""The baselines, trained by the same code as the method and at its thin-net step budget.

scratch: the thin net from a fresh init with labels. kd: the thin net from a fresh init with
logit distillation from the wide net (``baseline.distill``). deeper: a deeper thin net from
scratch. All three use the from-scratch recipe (``baseline.optim``), so only the method differs
between arms; ``gwtn compare`` tunes each arm's recipe with the same effort.
"""

from __future__ import annotations

from pathlib import Path

from ..config import BASELINES, Config
from ..distributed.runtime import Runtime
from ..models.family import build_thin, family_for, imitation_points
from .finetune import train_thin


def method_budget(cfg: Config) -> int:
    """Thin-net steps the method spends: every imitation phase plus fine-tuning."""
    points = imitation_points(build_thin(cfg.model), cfg.model)
    f = cfg.finetune
    return len(points) * cfg.imitate.steps_per_point + f.kd_steps + f.label_steps


def train_baseline(rt: Runtime, cfg: Config, run_dir: Path, arm: str,
                   teacher: Path | None) -> dict:
    """Train baseline ``arm`` into ``run_dir/<arm>`` for the method's thin-net budget."""
    budget = method_budget(cfg)
    if arm == "scratch":
        return train_thin(rt, cfg, run_dir, arm, init=None, teacher=None, kd_steps=0,
                          label_steps=budget, optim=cfg.baseline.optim)
    if arm == "kd":
        if teacher is None:
            raise ValueError("the kd baseline needs a trained wide net")
        return train_thin(rt, cfg, run_dir, arm, init=None, teacher=teacher, kd_steps=budget,
                          label_steps=0, optim=cfg.baseline.optim, distill=cfg.baseline.distill)
    if arm == "deeper":
        family = family_for(cfg.model)
        depth = family.deeper_depth(cfg)
        return train_thin(rt, cfg, run_dir, arm, init=None, teacher=None, kd_steps=0,
                          label_steps=budget, optim=cfg.baseline.optim, blocks=depth,
                          extra={family.depth_label: depth})
    raise ValueError(f"unknown baseline {arm!r}; choose from {', '.join(BASELINES)}")
