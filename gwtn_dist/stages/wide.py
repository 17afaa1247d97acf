"""Stage 1: train the wide twin with the ordinary task loss."""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path

from ..config import Config
from ..distributed.runtime import barrier, current
from ..models.family import build_wide, shape_meta
from . import teacher_cache
from .common import (
    finish_stage,
    loop_context,
    place,
    read_stage,
    seed_everything,
    stage_done,
    update_summary,
)
from .loop import Phase, run_phases
from .tasks import task_for

STAGE = "wide"


def train_wide(cfg: Config, run_dir: Path) -> dict:
    """Train the wide net into ``run_dir/wide``; returns the stage record (skips a DONE stage,
    and copies the teacher from ``wide.cache`` when it is there)."""
    stage_dir = run_dir / STAGE
    if stage_done(stage_dir):
        return read_stage(stage_dir)
    if current().is_main and teacher_cache.fetch(cfg, stage_dir):
        record = {**read_stage(stage_dir), "from_cache": str(teacher_cache.cache_dir(cfg))}
        (stage_dir / "stage.json").write_text(json.dumps(record, indent=2))
        update_summary(run_dir, STAGE, record)
    barrier()
    if stage_done(stage_dir):
        return read_stage(stage_dir)
    seed_everything(cfg.seed)
    ctx = loop_context(cfg, stage_dir, {}, stream_tag=1)
    wide = place(build_wide(cfg.model), cfg, ctx.device)
    ctx.modules = {"wide": wide}
    task = task_for(cfg)

    phase = Phase(STAGE, cfg.wide.steps, cfg.wide.optim,
                  groups=lambda: [{"params": list(wide.parameters())}],
                  loss=partial(task.label_loss, wide), module=wide, setup=wide.train,
                  eval_model=wide, zero_stage=cfg.dist.wide_zero_stage)
    results = run_phases(ctx, [phase])
    meta = {"stage": STAGE, **shape_meta(cfg.model, wide=True)}
    record = finish_stage(cfg, run_dir, STAGE, wide, results, meta)
    if current().is_main:
        teacher_cache.store(cfg, stage_dir)
    return record
