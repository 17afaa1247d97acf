"""A run's choices resolved once, at the start of a command, and handed to every stage.

``resolve(cfg)`` looks the model family up in its registry, makes the family's task, reads
the imitation points the thin net declares and the arms that ``arms:`` names; the stages,
``gwtn run`` and ``gwtn compare`` take the ``RunSpec`` and never look a family up again (as
precision is resolved once into the ``Runtime``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .arms import Arm, arm_named, thin_budget
from .config import Config
from .models.family import Depth, Family, family_for
from .models.task import ScoredTask


@dataclass(frozen=True)
class RunSpec:
    """Everything a run's config resolves to: the config itself, its family, the family's task,
    the thin net's imitation points (bottom to top) and the arms to train."""

    cfg: Config
    family: Family
    task: ScoredTask
    points: tuple[str, ...]
    arms: tuple[Arm, ...]

    def build_thin(self, depth: Depth | None = None) -> nn.Module:
        """A fresh thin net (``depth``: a deeper variant's, in the family's depth)."""
        return self.family.build(self.family.shape(self.cfg.model, False, depth))

    def build_wide(self) -> nn.Module:
        """A fresh wide twin."""
        return self.family.build(self.family.shape(self.cfg.model, True))

    def shape_meta(self, wide: bool, depth: Depth | None = None) -> dict:
        """What saved weights record to be rebuilt: the family and the shape's fields."""
        shape = self.family.shape(self.cfg.model, wide, depth)
        return {"family": self.cfg.model.family, "shape": shape.__dict__}

    @property
    def budget(self) -> int:
        """The method's thin-net steps, which every baseline is given too."""
        f = self.cfg.finetune
        return thin_budget(self.cfg.imitate.steps_per_point, len(self.points), f.kd_steps,
                           f.label_steps)


def declared_points(family: Family, cfg: Config) -> tuple[str, ...]:
    """The imitation points the thin net declares, read from a net built on the meta device
    (no memory, no draws from the random generators)."""
    with torch.device("meta"):
        thin = family.build(family.shape(cfg.model, False))
    return tuple(family.imitation_points(thin, cfg.model))


def resolve(cfg: Config) -> RunSpec:
    """The run spec of ``cfg`` (an unknown family is a ConfigError naming ``model.family``)."""
    family = family_for(cfg.model)
    return RunSpec(cfg=cfg, family=family, task=family.task(cfg),
                   points=declared_points(family, cfg),
                   arms=tuple(arm_named(name) for name in cfg.arms))
