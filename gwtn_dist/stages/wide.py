"""Stage 1: train the wide twin with the ordinary task loss, or bring it (``wide.init``).

With ``wide.init`` the twin starts from given weights (a ResNet state dict; a Hugging Face
BertForMaskedLM folder for a BERT); with ``wide.steps: 0`` too,
it is not trained at all: the stage loads, scores and saves it, leaving the same files as a
trained teacher, so the later stages use it unchanged.
"""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path

from .. import checkpoint
from ..distributed.runtime import Runtime, barrier
from ..spec import RunSpec
from . import teacher_cache
from .common import (
    check_init,
    finish_stage,
    load_init,
    loop_context,
    place,
    read_stage,
    resolve_device,
    seed_everything,
    stage_done,
    update_summary,
)
from .loop import Phase, run_phases

STAGE = "wide"


def train_wide(rt: Runtime, spec: RunSpec, run_dir: Path) -> dict:
    """Train the wide net into ``run_dir/wide``; returns the stage record (skips a DONE stage,
    and copies the teacher from ``wide.cache`` when it is there)."""
    cfg = spec.cfg
    stage_dir = run_dir / STAGE
    if stage_done(stage_dir):
        return read_stage(stage_dir)
    check_init(cfg.wide.init, "wide.init")
    if rt.is_main and teacher_cache.fetch(cfg, stage_dir):
        record = {**read_stage(stage_dir), "from_cache": str(teacher_cache.cache_dir(cfg))}
        checkpoint.atomic_write_text(stage_dir / "stage.json", json.dumps(record, indent=2))
        update_summary(run_dir, STAGE, record)
    barrier()
    if stage_done(stage_dir):
        return read_stage(stage_dir)
    seed_everything(cfg.seed)
    meta = {"stage": STAGE, **spec.shape_meta(wide=True)}
    extra = {"init": cfg.wide.init} if cfg.wide.init else None
    if cfg.wide.steps == 0:
        wide = place(rt, load_init(spec.family, spec.build_wide(), cfg.wide.init), cfg,
                     resolve_device(rt, cfg))
        if rt.is_main:  # a trained stage's files, its step log empty
            stage_dir.mkdir(parents=True, exist_ok=True)
            (stage_dir / "metrics.jsonl").write_text("")
        record = finish_stage(rt, spec, run_dir, STAGE, wide, [], meta, extra)
    else:
        record = _train(rt, spec, run_dir, meta, extra)
    if rt.is_main:
        teacher_cache.store(cfg, stage_dir)
    return record


def _train(rt: Runtime, spec: RunSpec, run_dir: Path, meta: dict, extra: dict | None) -> dict:
    cfg, task = spec.cfg, spec.task
    ctx = loop_context(rt, spec, run_dir / STAGE, {}, stream_tag=1)
    wide = spec.build_wide()
    if cfg.wide.init:
        load_init(spec.family, wide, cfg.wide.init)
    wide = place(rt, wide, cfg, ctx.device)
    ctx.modules = {"wide": wide}

    phase = Phase(STAGE, cfg.wide.steps, cfg.wide.optim,
                  groups=lambda: [{"params": list(wide.parameters())}],
                  loss=partial(task.label_loss, wide), module=wide, setup=wide.train,
                  eval_model=wide, zero_stage=cfg.dist.wide_zero_stage)
    results = run_phases(ctx, [phase])
    return finish_stage(rt, spec, run_dir, STAGE, wide, results, meta, extra)
