"""What every stage shares: device, evaluation, the loop context, and the stage's outputs.

A finished stage leaves ``run_dir/<stage>/`` with ``model.pt`` (consolidated weights),
``metrics.jsonl``, ``stage.json`` (its summary) and ``DONE``; its summary is also merged into
``run_dir/summary.json``. Every rank runs the stage code; rank 0 writes the files.
"""

from __future__ import annotations

import json
import logging
import random
from functools import partial
from pathlib import Path

import torch
from torch import nn

from .. import checkpoint
from ..config import Config, ConfigError
from ..data.datasets import train_batches
from ..distributed.engines import engine_type
from ..distributed.runtime import Runtime, all_reduce_sum, barrier, device_for
from ..models.compiled import compile_blocks
from ..models.family import Family
from ..models.task import ScoredTask
from ..models.weights import UnreadableWeights, WeightsError
from ..spec import RunSpec
from .loop import LoopContext, PhaseResult

log = logging.getLogger("gwtn")


class StageOrderError(RuntimeError):
    """A stage was asked for before the stage it builds on finished."""


def check_init(path: str, key: str) -> None:
    """A ConfigError naming ``key`` when its weights path is set but absent."""
    if path and not Path(path).exists():
        raise ConfigError(f"{key}: {path} not found")


def load_init(family: Family, model: nn.Module, path: str, key: str = "wide.init") -> nn.Module:
    """``model`` with the weights at ``path`` (``key``: the config key that named them; read
    by ``family.load_weights``); anything that does not fit is a one-line ConfigError naming
    the tensor and both shapes."""
    try:
        family.load_weights(model, Path(path))
    except UnreadableWeights as exc:  # the file, not the net's shape: exit 4
        raise checkpoint.CheckpointError(f"{key}: {exc}") from None
    except WeightsError as exc:
        where = "model.* and model.widen.*" if key == "wide.init" else "model.*"
        raise ConfigError(f"{key}: {exc} (the net's shape comes from {where}; "
                          f"{family.docs})") from None
    return model


def resolve_device(rt: Runtime, cfg: Config) -> torch.device:
    """This rank's device: cfg.device, and on several GPUs the one of its local rank."""
    return device_for(cfg, rt.env)


def memory_format(cfg: Config) -> torch.memory_format:
    return torch.channels_last if cfg.channels_last else torch.contiguous_format


def place(rt: Runtime, model: nn.Module, cfg: Config, device: torch.device) -> nn.Module:
    """Move a net that will train to the run's device, laid out as the run's engine wants it
    (``Engine.place``: its memory format, and under DeepSpeed with ``dist.sync_batchnorm``
    batch norms over the global batch); with ``model.compile``, its blocks run under
    torch.compile."""
    model = engine_type(rt).place(model, device, memory_format(cfg), cfg.dist.sync_batchnorm)
    return compile_blocks(model) if cfg.model.compile else model


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


@torch.no_grad()
def evaluate(rt: Runtime, model: nn.Module, task: ScoredTask, device: torch.device,
             limit: int = 0, split: str = "test") -> dict:
    """The task's metrics over the held-out ``split`` (its first ``limit`` samples if set):
    ``test``/``val`` accuracy and cross-entropy for images, masked-LM accuracy and perplexity
    for text.

    Each rank scores its share of the split and the counts are summed, so every sample is
    scored once. Every rank runs the same number of forwards (a rank out of batches runs rank
    0's first one again and does not count it), as a ZeRO-3 net's forward is a collective.
    """
    was_training = model.training
    model.eval()
    sums = torch.zeros(3, dtype=torch.float64)  # the task's counts (correct, samples, loss)
    batches = task.eval_batches(limit, rt.rank, rt.world_size, split)
    filler = None
    while True:
        mine = next(batches, None)
        if all_reduce_sum(torch.tensor([mine is not None])).item() == 0:
            break  # every rank is done
        if mine is None and filler is None:
            filler = next(task.eval_batches(limit, 0, rt.world_size, split))
        x, y = task.prepare(*(mine if mine is not None else filler), device,
                            dtype=next(model.parameters()).dtype)
        logits, targets = task.scored(model, x, y)
        if mine is not None:
            sums += task.eval_sums(logits, targets)
    scores = task.eval_metrics(all_reduce_sum(sums).tolist(), split)
    model.train(was_training)
    return scores


def loop_context(rt: Runtime, spec: RunSpec, stage_dir: Path, modules: dict[str, nn.Module],
                 stream_tag: int, step_offset: int = 0) -> LoopContext:
    """The LoopContext of a stage; ``stream_tag`` gives each stage its own data order."""
    cfg, task = spec.cfg, spec.task
    device = resolve_device(rt, cfg)
    return LoopContext(
        stage_dir=stage_dir, modules=modules,
        batches=train_batches(cfg, cfg.seed * 101 + stream_tag, rt.rank, rt.world_size),
        device=device, micro_batch=cfg.data.batch_size // rt.world_size,
        prepare=partial(task.prepare, device=device, dtype=rt.dtype),
        checkpoint_every=cfg.checkpoint.every, dist=cfg.dist, rt=rt, progress=cfg.progress,
        evaluate=lambda m: evaluate(rt, m, task, device, limit=cfg.eval_samples,
                                    split=task.curve_split),
        eval_every=cfg.eval_every, step_offset=step_offset, log_every=cfg.log_every,
        profile=cfg.profile, logging=cfg.logging, prefetch=cfg.data.prefetch,
        tokens=task.tokens,
    )


def stage_done(stage_dir: Path) -> bool:
    return (stage_dir / "DONE").is_file()


def read_stage(stage_dir: Path) -> dict:
    return json.loads((stage_dir / "stage.json").read_text())


def require_stage(stage_dir: Path, command: str) -> Path:
    """The model.pt of a finished stage, or an error that says which command makes it."""
    if not stage_done(stage_dir):
        raise StageOrderError(f"{stage_dir} has not finished; run `gwtn {command}` first")
    return stage_dir / "model.pt"


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def finish_stage(rt: Runtime, spec: RunSpec, run_dir: Path, stage: str, model: nn.Module,
                 results: list[PhaseResult], meta: dict, extra: dict | None = None) -> dict:
    """Save the stage's net, score it on the validation and test splits (the task's
    ``score_splits``), write stage.json + DONE, update summary."""
    stage_dir = run_dir / stage
    device = next(model.parameters()).device
    scores = {}
    task = spec.task
    for split in task.score_splits:
        scores.update(evaluate(rt, model, task, device, split=split))
    record = {
        "stage": stage,
        "steps": sum(r.steps for r in results),
        "wall_s": round(sum(r.wall_s for r in results), 2),
        "final_loss": results[-1].final_loss if results else None,
        **scores,
        "params": count_params(model),
        "phases": [r.as_dict() for r in results],
        # Where each resume picked up (empty for a stage that ran straight through).
        "resumes": list(getattr(results, "resumes", [])),
        # Bad training samples skipped by every rank's reader and worker, by reason.
        "skipped_samples": dict(getattr(results, "skipped", {})),
        "world_size": rt.world_size,
        **(extra or {}),
    }
    if rt.is_main:
        checkpoint.save_weights(model, stage_dir / "model.pt", meta)
        checkpoint.atomic_write_text(stage_dir / "stage.json", json.dumps(record, indent=2))
        (stage_dir / "DONE").write_text("")
        update_summary(run_dir, stage, record)
        shown = task.metric if task.metric in scores else task.select_metric
        log.info("%s done: %s %.4f (%d steps, %.0f s)", stage,
                 task.labels.get(shown, shown.replace("_", " ")), scores[shown], record["steps"],
                 record["wall_s"])
    barrier()
    return record


def update_summary(run_dir: Path, stage: str, record: dict) -> None:
    """Merge one stage's record into ``run_dir/summary.json`` (written atomically)."""
    path = run_dir / "summary.json"
    summary = json.loads(path.read_text()) if path.is_file() else {"stages": {}}
    summary["stages"][stage] = {k: v for k, v in record.items() if k != "stage"}
    # The run's total of skipped bad samples, over its stages, by reason.
    total: dict[str, int] = {}
    for rec in summary["stages"].values():
        for reason, n in rec.get("skipped_samples", {}).items():
            total[reason] = total.get(reason, 0) + n
    summary["skipped_samples"] = total
    checkpoint.atomic_write_text(path, json.dumps(summary, indent=2))
