"""What every stage shares: device, evaluation, the loop context, and the stage's outputs.

A finished stage leaves ``run_dir/<stage>/`` with ``model.pt`` (consolidated weights),
``metrics.jsonl``, ``stage.json`` (its summary) and ``DONE``; its summary is also merged into
``run_dir/summary.json``.
"""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .. import checkpoint
from ..config import Config
from ..data.shards import TrainStream, eval_batches, to_model_input
from .loop import LoopContext, PhaseResult

log = logging.getLogger("gwtn")


class StageOrderError(RuntimeError):
    """A stage was asked for before the stage it builds on finished."""


def resolve_device(cfg: Config) -> torch.device:
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device=cuda was asked for but torch sees no CUDA device")
    if cfg.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(cfg.device)


def memory_format(cfg: Config) -> torch.memory_format:
    return torch.channels_last if cfg.channels_last else torch.contiguous_format


def place(model: nn.Module, cfg: Config, device: torch.device) -> nn.Module:
    """Move a net to the run's device and memory format."""
    return model.to(device=device, memory_format=memory_format(cfg))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


@torch.no_grad()
def evaluate(model: nn.Module, cfg: Config, device: torch.device, limit: int = 0) -> dict:
    """Test accuracy and cross-entropy over the test split (its first ``limit`` samples if set)."""
    was_training = model.training
    model.eval()
    correct, total, loss_sum = 0, 0, 0.0
    for images, labels in eval_batches(cfg.data.shards, cfg.data.eval_batch_size, limit=limit):
        x = to_model_input(images, cfg.data.mean, cfg.data.std)
        x = x.to(device).contiguous(memory_format=memory_format(cfg))
        y = labels.to(device)
        logits = model(x)
        loss_sum += F.cross_entropy(logits, y, reduction="sum").item()
        correct += (logits.argmax(1) == y).sum().item()
        total += len(y)
    model.train(was_training)
    return {"test_accuracy": correct / max(total, 1), "test_loss": loss_sum / max(total, 1),
            "test_samples": total}


def loop_context(cfg: Config, stage_dir: Path, modules: dict[str, nn.Module], stream_tag: int,
                 step_offset: int = 0) -> LoopContext:
    """The LoopContext of a stage; ``stream_tag`` gives each stage its own data order."""
    device = resolve_device(cfg)
    stream = TrainStream(cfg.data.shards, cfg.data.batch_size, seed=cfg.seed * 101 + stream_tag,
                         shuffle_buffer=cfg.data.shuffle_buffer, limit=cfg.data.train_samples)
    return LoopContext(
        stage_dir=stage_dir, modules=modules, stream=stream, device=device, seed=cfg.seed,
        mean=cfg.data.mean, std=cfg.data.std, crop_padding=cfg.data.crop_padding,
        hflip=cfg.data.hflip, memory_format=memory_format(cfg),
        checkpoint_every=cfg.checkpoint.every, progress=cfg.progress,
        evaluate=lambda m: evaluate(m, cfg, device, limit=cfg.eval_samples),
        eval_every=cfg.eval_every, step_offset=step_offset,
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


def finish_stage(cfg: Config, run_dir: Path, stage: str, model: nn.Module,
                 results: list[PhaseResult], meta: dict, extra: dict | None = None) -> dict:
    """Save the stage's net, score it on the test set, write stage.json + DONE, update summary."""
    stage_dir = run_dir / stage
    device = next(model.parameters()).device
    scores = evaluate(model, cfg, device)
    checkpoint.save_weights(model, stage_dir / "model.pt", meta)
    record = {
        "stage": stage,
        "steps": sum(r.steps for r in results),
        "wall_s": round(sum(r.wall_s for r in results), 2),
        "final_loss": results[-1].final_loss if results else None,
        **scores,
        "params": count_params(model),
        "phases": [r.as_dict() for r in results],
        **(extra or {}),
    }
    (stage_dir / "stage.json").write_text(json.dumps(record, indent=2))
    (stage_dir / "DONE").write_text("")
    update_summary(run_dir, stage, record)
    log.info("%s done: test accuracy %.4f (%d steps, %.0f s)", stage, scores["test_accuracy"],
             record["steps"], record["wall_s"])
    return record


def update_summary(run_dir: Path, stage: str, record: dict) -> None:
    """Merge one stage's record into ``run_dir/summary.json`` (written atomically)."""
    path = run_dir / "summary.json"
    summary = json.loads(path.read_text()) if path.is_file() else {"stages": {}}
    summary["stages"][stage] = {k: v for k, v in record.items() if k != "stage"}
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(summary, indent=2))
    tmp.replace(path)
