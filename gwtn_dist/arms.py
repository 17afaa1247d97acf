"""The arms a run trains and a comparison compares, each defined once: its stages, whether it
needs the trained wide net, what its tuning grid may set, and the function that trains it.

``arms:`` in a config names arms of this registry. The method (``win``) trains ``imitate`` then
``finetune`` from the wide stage's net; the baselines train the thin net from a fresh init at
the method's thin-net budget (``thin_budget``, the one formula for it). ``register_arm`` adds
an arm. This module imports no torch (the config loader checks ``arms:`` against it); an arm's
training function is imported when it first runs.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Arm:
    """One arm: what it trains, and how it is tuned and reported."""

    name: str  # its name in ``arms:`` and in compare.json
    label: str  # its row in the reports
    stages: tuple[str, ...]  # its stage folders, in training order; the last one's DONE ends it
    needs_teacher: bool  # trains from the wide stage's net
    tunable: tuple[str, ...]  # the config keys (prefixes) its tuning grid may set
    train: str  # "module:function" (rt, spec, run_dir, teacher_dir) → {stage: record}
    is_method: bool = False  # the arm the comparison is about (``gwtn run`` always trains it)
    warm_start: str | None = None  # a stage whose net reports show as the warm start
    # The arms this one gets a paired verdict against, where they ran (the first: the thin net
    # from scratch; the method's second: a deeper thin net, the paper's headline).
    judged_against: tuple[str, ...] = ()
    bar: str | None = None  # an arm whose mean it must also reach to pay against the first

    @property
    def final_stage(self) -> str:
        """The stage folder whose DONE marks the arm finished."""
        return self.stages[-1]

    def trainer(self) -> Callable:
        """The function that trains this arm (imported on first use)."""
        module, _, function = self.train.partition(":")
        return getattr(importlib.import_module(module), function)


ARMS: dict[str, Arm] = {}


def register_arm(arm: Arm) -> None:
    """Make ``arm`` the one ``arms: [<arm.name>]`` selects."""
    ARMS[arm.name] = arm


def arm_named(name: str) -> Arm:
    """The registered arm ``name`` (KeyError naming the known arms otherwise)."""
    if name not in ARMS:
        raise KeyError(f"{name!r} is not an arm; choose from {', '.join(ARMS)}")
    return ARMS[name]


def method() -> Arm:
    """The arm the verdicts judge."""
    return next(arm for arm in ARMS.values() if arm.is_method)


# The method's thin-net steps: what every baseline is given (imitation points × steps per
# point + logit-KD steps + label steps). The keys are the ones a tuning grid may not set.
BUDGET_KEYS = ("imitate.steps_per_point", "finetune.kd_steps", "finetune.label_steps")


def thin_budget(steps_per_point: int, points: int, kd_steps: int, label_steps: int) -> int:
    """Thin-net steps the method spends: every imitation phase plus fine-tuning."""
    return points * steps_per_point + kd_steps + label_steps


_STAGES = "gwtn_dist.stages.arms"
register_arm(Arm("scratch", "thin from scratch", ("scratch",), needs_teacher=False,
                 tunable=("baseline.optim.",), train=f"{_STAGES}:train_scratch"))
register_arm(Arm("kd", "thin, logit KD only", ("kd",), needs_teacher=True,
                 tunable=("baseline.",), train=f"{_STAGES}:train_kd",
                 judged_against=("scratch",)))
register_arm(Arm("win", "thin, Go Wide Then Narrow", ("imitate", "finetune"),
                 needs_teacher=True, tunable=("imitate.", "finetune."),
                 train=f"{_STAGES}:train_method", is_method=True, warm_start="imitate",
                 judged_against=("scratch", "deeper"), bar="kd"))
register_arm(Arm("deeper", "deeper thin from scratch", ("deeper",), needs_teacher=False,
                 tunable=("baseline.optim.",), train=f"{_STAGES}:train_deeper",
                 judged_against=("scratch",)))


def run_arm(rt, spec, run_dir, arm: Arm, teacher_dir) -> dict:
    """Train ``arm`` into ``run_dir`` (a finished stage is read, not trained again) from the
    wide stage in ``teacher_dir``; returns {stage: record} (the one call ``gwtn run`` and
    ``gwtn compare`` share)."""
    return arm.trainer()(rt, spec, run_dir, teacher_dir)
