"""How each arm of ``gwtn_dist/arms.py`` trains: the method's stages, and the baselines,
trained by the same code as the method and at its thin-net budget.

scratch: the thin net from a fresh init with labels. kd: the thin net from a fresh init with
logit distillation from the wide net (``baseline.distill``). deeper: a deeper thin net from
scratch. All three use the from-scratch recipe (``baseline.optim``), so only the method differs
between arms; ``gwtn compare`` tunes each arm's recipe with the same effort. Each trainer takes
(rt, spec, run_dir, teacher_dir: the finished wide stage) and returns {stage: record}.
"""

from __future__ import annotations

from pathlib import Path

from ..distributed.runtime import Runtime
from ..spec import RunSpec
from .finetune import finetune, train_thin
from .imitate import imitate


def train_method(rt: Runtime, spec: RunSpec, run_dir: Path, teacher_dir: Path) -> dict:
    """Go wide, then narrow: imitate the wide net, then fine-tune."""
    return {"imitate": imitate(rt, spec, run_dir, teacher_dir=teacher_dir),
            "finetune": finetune(rt, spec, run_dir, teacher_dir=teacher_dir)}


def train_scratch(rt: Runtime, spec: RunSpec, run_dir: Path, teacher_dir: Path) -> dict:
    """The thin net from a fresh init, with labels, for the method's budget."""
    return {"scratch": train_thin(rt, spec, run_dir, "scratch", init=None, teacher=None,
                                  kd_steps=0, label_steps=spec.budget,
                                  optim=spec.cfg.baseline.optim)}


def train_kd(rt: Runtime, spec: RunSpec, run_dir: Path, teacher_dir: Path) -> dict:
    """The thin net from a fresh init, distilling the wide net's logits, for the budget."""
    b = spec.cfg.baseline
    return {"kd": train_thin(rt, spec, run_dir, "kd", init=None,
                             teacher=teacher_dir / "model.pt", kd_steps=spec.budget,
                             label_steps=0, optim=b.optim, distill=b.distill)}


def train_deeper(rt: Runtime, spec: RunSpec, run_dir: Path, teacher_dir: Path) -> dict:
    """A deeper thin net (``compare.deeper_*``) from scratch, with labels, for the budget."""
    depth = spec.family.deeper_depth(spec.cfg)
    return {"deeper": train_thin(rt, spec, run_dir, "deeper", init=None, teacher=None,
                                 kd_steps=0, label_steps=spec.budget,
                                 optim=spec.cfg.baseline.optim, blocks=depth,
                                 extra={spec.family.depth_label: depth})}
