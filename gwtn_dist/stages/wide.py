"""Stage 1: train the wide twin with the ordinary task loss."""

from __future__ import annotations

from functools import partial
from pathlib import Path

from ..config import Config
from ..models.family import build_wide, shape_meta
from .common import finish_stage, loop_context, place, read_stage, seed_everything, stage_done
from .loop import Phase, run_phases
from .tasks import task_for

STAGE = "wide"


def train_wide(cfg: Config, run_dir: Path) -> dict:
    """Train the wide net into ``run_dir/wide``; returns the stage record (skips a DONE stage)."""
    stage_dir = run_dir / STAGE
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
    return finish_stage(cfg, run_dir, STAGE, wide, results, meta)
