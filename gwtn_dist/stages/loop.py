"""The one training loop: a stage is a list of phases run in order, with exact resume.

Every stage (wide training, each imitation phase, distillation, label training, the baselines)
is a ``Phase``: how many steps, which parameters train at which lr multiplier, and the loss of a
batch. ``run_phases`` streams batches, augments them, steps the engine, logs to
``metrics.jsonl``, shows progress, and writes an atomic checkpoint every ``checkpoint_every``
steps and at each phase end. A checkpoint holds everything that decides the rest of the run
(weights, optimizer and schedule, stream position, phase and step), so a resumed run ends with
the same weights as an uninterrupted one.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from .. import checkpoint
from ..config import OptimConfig
from ..data.shards import TrainStream, augment, to_model_input
from ..dist.engines import make_engine

log = logging.getLogger("gwtn")
LossFn = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, dict]]


@dataclass
class Phase:
    """One run of the loop with one objective and one schedule.

    groups() returns the parameter groups to train (``{"params", "lr_mult"}``); it is called when
    the phase starts, after ``setup()`` has put modules in train/eval mode and set requires_grad.
    loss(x, y) gets a normalised, augmented batch (B, C, H, W) and labels (B,) on the device.
    """

    name: str
    steps: int
    optim: OptimConfig
    groups: Callable[[], list[dict]]
    loss: LossFn
    setup: Callable[[], None] = lambda: None
    eval_model: nn.Module | None = None


@dataclass
class PhaseResult:
    name: str
    steps: int
    final_loss: float
    wall_s: float

    def as_dict(self) -> dict:
        return {"name": self.name, "steps": self.steps, "final_loss": self.final_loss,
                "wall_s": round(self.wall_s, 2)}


@dataclass
class LoopContext:
    """What a stage's phases share: where to write, what to save, where batches come from.

    modules: every module whose state must survive a crash (the students, bridges), by name.
    evaluate(model) → metrics dict (test accuracy …), called every ``eval_every`` global steps.
    step_offset: thin-net steps already taken before this stage (for accuracy-vs-steps curves).
    """

    stage_dir: Path
    modules: dict[str, nn.Module]
    stream: TrainStream
    device: torch.device
    seed: int
    mean: float
    std: float
    crop_padding: int
    hflip: bool
    memory_format: torch.memory_format
    checkpoint_every: int
    progress: bool = True
    evaluate: Callable[[nn.Module], dict] | None = None
    eval_every: int = 0
    step_offset: int = 0


class MetricsLog:
    """Append-only JSON lines; on resume, lines past the checkpoint are dropped."""

    def __init__(self, path: Path):
        self.path = path

    def write(self, record: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def truncate_after(self, phase_index: int, step: int) -> None:
        if not self.path.is_file():
            return
        keep = []
        for line in self.path.read_text().splitlines():
            rec = json.loads(line)
            if (rec["phase_index"], rec["step"]) <= (phase_index, step):
                keep.append(line)
        self.path.write_text("".join(k + "\n" for k in keep))


def _batch_generator(seed: int, phase_index: int, step: int) -> torch.Generator:
    # Augmentation randomness is a function of (seed, phase, step) alone, so it replays on resume.
    return torch.Generator().manual_seed(seed * 1_000_003 + phase_index * 100_003 + step)


def _progress_bar(ctx: LoopContext, phase: Phase, start: int) -> tqdm:
    interactive = sys.stderr.isatty()
    return tqdm(total=phase.steps, initial=start, desc=phase.name, unit="step",
                disable=not ctx.progress, dynamic_ncols=True, leave=interactive,
                mininterval=0.5 if interactive else 15.0)


def run_phases(ctx: LoopContext, phases: list[Phase]) -> list[PhaseResult]:
    """Run ``phases`` in order, resuming from ``stage_dir/checkpoint.pt`` if it exists."""
    ctx.stage_dir.mkdir(parents=True, exist_ok=True)
    ckpt_path = ctx.stage_dir / "checkpoint.pt"
    metrics = MetricsLog(ctx.stage_dir / "metrics.jsonl")
    state = checkpoint.load(ckpt_path) if ckpt_path.is_file() else None
    results: list[PhaseResult] = []
    first_phase, first_step = 0, 0
    if state is not None:
        for name, module in ctx.modules.items():
            module.load_state_dict(state["modules"][name])
        ctx.stream.seek(state["stream"])
        results = [PhaseResult(**r) for r in state["results"]]
        first_phase, first_step = state["phase_index"], state["step"]
        metrics.truncate_after(first_phase, first_step)
        log.info("resuming %s at phase %d (%s), step %d", ctx.stage_dir.name, first_phase,
                 phases[first_phase].name if first_phase < len(phases) else "-", first_step)
    elif (ctx.stage_dir / "metrics.jsonl").exists():
        (ctx.stage_dir / "metrics.jsonl").unlink()

    global_step = ctx.step_offset + sum(p.steps for p in phases[:first_phase]) + first_step
    for index in range(first_phase, len(phases)):
        phase = phases[index]
        start = first_step if index == first_phase else 0
        phase.setup()
        engine = make_engine(phase.groups(), phase.optim, phase.steps)
        recent: list[float] = []
        wall = 0.0
        if state is not None and index == first_phase and start > 0:
            engine.load_state_dict(state["engine"])
            recent, wall = list(state["recent_losses"]), float(state["phase_wall_s"])

        bar = _progress_bar(ctx, phase, start)
        tick = time.perf_counter()
        for step in range(start, phase.steps):
            images, labels = next(ctx.stream)
            images = augment(images, _batch_generator(ctx.seed, index, step),
                             ctx.crop_padding, ctx.hflip)
            x = to_model_input(images, ctx.mean, ctx.std)
            x = x.to(ctx.device).contiguous(memory_format=ctx.memory_format)
            y = labels.to(ctx.device)
            loss, extra = phase.loss(x, y)
            if not torch.isfinite(loss):
                raise FloatingPointError(
                    f"{phase.name}: loss became {loss.item()} at step {step + 1}; "
                    f"lower the learning rate ({phase.optim.lr}) or enable grad_clip"
                )
            engine.step(loss)
            global_step += 1
            value = loss.item()
            recent = (recent + [value])[-50:]
            wall += time.perf_counter() - tick  # training time only: evaluation is not counted
            record = {"phase": phase.name, "phase_index": index, "step": step + 1,
                      "global_step": global_step, "loss": value, "lr": engine.lr, **extra}
            if ctx.evaluate and phase.eval_model is not None and ctx.eval_every \
                    and global_step % ctx.eval_every == 0:
                record.update(ctx.evaluate(phase.eval_model))
                phase.setup()
            metrics.write(record)
            bar.update(1)
            bar.set_postfix(loss=f"{value:.4f}", lr=f"{engine.lr:.3g}", refresh=False)
            if (step + 1) % ctx.checkpoint_every == 0 or step + 1 == phase.steps:
                done = step + 1 == phase.steps
                if done:
                    results.append(PhaseResult(phase.name, phase.steps,
                                               sum(recent) / len(recent), wall))
                # At a phase end, point the checkpoint at the start of the next phase.
                checkpoint.atomic_save({
                    "modules": {n: m.state_dict() for n, m in ctx.modules.items()},
                    "engine": engine.state_dict(),
                    "stream": ctx.stream.position,
                    "phase_index": index + 1 if done else index,
                    "step": 0 if done else step + 1,
                    "recent_losses": recent, "phase_wall_s": wall,
                    "results": [r.as_dict() for r in results],
                }, ckpt_path)
            tick = time.perf_counter()
        bar.close()
        log.info("%s: %d steps, loss %.4f, %.1f s", phase.name, phase.steps,
                 results[-1].final_loss, results[-1].wall_s)
    return results
