"""Stage 3 (and the baselines): train a thin net with logit distillation and/or labels.

``train_thin`` is shared by the fine-tune stage (starting from the imitated net) and by the
baseline arms of ``gwtn compare`` (starting from scratch, possibly deeper), so every arm is
trained by the same code.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

from .. import checkpoint
from ..config import DistillConfig, OptimConfig
from ..distributed.runtime import Runtime
from ..distributed.teacher import load_teacher
from ..models.family import Depth
from ..models.task import accuracy
from ..spec import RunSpec
from .common import (
    finish_stage,
    loop_context,
    place,
    read_stage,
    require_stage,
    seed_everything,
    stage_done,
)
from .loop import Phase, run_phases
from .losses import distillation_loss

STAGE = "finetune"


def train_thin(rt: Runtime, spec: RunSpec, run_dir: Path, stage: str, *, init: Path | None,
               teacher: Path | None, kd_steps: int, label_steps: int, optim: OptimConfig,
               blocks: Depth | None = None, step_offset: int = 0,
               extra: dict | None = None, distill: DistillConfig | None = None) -> dict:
    """Train a thin net into ``run_dir/<stage>``: ``kd_steps`` of distillation, then labels.

    init: weights to start from (None: a fresh net seeded by cfg.seed). blocks: depth of the
    thin net (None: the config's; blocks per stage for a ResNet, layers for a BERT).
    step_offset: thin-net steps already spent on this net (the imitation steps), for the
    accuracy-vs-steps curves. distill: the distillation's α and T (default
    ``finetune.distill``).
    """
    cfg, task = spec.cfg, spec.task
    stage_dir = run_dir / stage
    if stage_done(stage_dir):
        return read_stage(stage_dir)
    seed_everything(cfg.seed + 2)
    ctx = loop_context(rt, spec, stage_dir, {}, stream_tag=3, step_offset=step_offset)
    thin = spec.build_thin(blocks)
    if init is not None:
        checkpoint.load_weights(thin, init)
    thin = place(rt, thin, cfg, ctx.device)
    ctx.modules = {"thin": thin}
    wide = load_teacher(rt, cfg, spec.build_wide(), teacher, ctx.device) if kd_steps else None
    d = distill or cfg.finetune.distill

    def kd_loss(x, y):
        # Images: every sample; text: the masked tokens. (N, classes), (N,).
        logits, targets = task.scored(thin, x, y)
        teacher, _ = task.scored(wide, x, y)  # (N, classes), no grad
        loss = distillation_loss(logits, teacher, targets, d.alpha, d.temperature)
        return loss, {"train_accuracy": accuracy(logits, targets)}

    def groups():
        return [{"params": list(thin.parameters())}]

    zero = cfg.dist.student_zero_stage

    phases = []
    if kd_steps:
        phases.append(Phase(f"{stage}/distill", kd_steps, optim, groups, kd_loss, thin,
                            setup=thin.train, eval_model=thin, zero_stage=zero))
    if label_steps:
        phases.append(Phase(f"{stage}/labels", label_steps, optim, groups,
                            partial(task.label_loss, thin), thin,
                            setup=thin.train, eval_model=thin, zero_stage=zero))
    results = run_phases(ctx, phases)
    if wide is not None:
        extra = {**(extra or {}), "teacher": wide.record()}
    meta = {"stage": stage, **spec.shape_meta(wide=False, depth=blocks)}
    return finish_stage(rt, spec, run_dir, stage, thin, results, meta, extra)


def finetune(rt: Runtime, spec: RunSpec, run_dir: Path, teacher_dir: Path | None = None) -> dict:
    """Stage 3: fine-tune the imitated thin net (optionally distilling from the wide net first).

    teacher_dir: the finished wide stage (default ``run_dir/wide``), used when kd_steps > 0.
    """
    cfg = spec.cfg
    init = require_stage(run_dir / "imitate", "imitate")
    teacher = None
    if cfg.finetune.kd_steps:
        teacher = require_stage(teacher_dir or run_dir / "wide", "wide")
    f = cfg.finetune
    imitate_steps = read_stage(run_dir / "imitate")["steps"]
    return train_thin(rt, spec, run_dir, STAGE, init=init, teacher=teacher, kd_steps=f.kd_steps,
                      label_steps=f.label_steps, optim=f.optim, step_offset=imitate_steps)
