"""Where a stage's metrics records go besides ``metrics.jsonl``: TensorBoard and W&B.

The training loop hands every record it writes to ``metrics.jsonl`` to the stage's sinks, from
that one place (``stages.loop.MetricsLog``), so every stage and every arm logs alike. A sink
takes the record's numeric fields as scalars at its ``global_step``; text fields (the phase
name) and the position fields (``phase_index``, ``step``, ``global_step``) are not scalars.

- ``logging.tensorboard: true`` writes event files under ``<stage dir>/tb`` with
  ``torch.utils.tensorboard`` (needs the ``tensorboard`` package: ``pip install
  gwtn_dist[tensorboard]``). A resumed stage purges the events past its checkpoint, as
  ``metrics.jsonl`` drops its lines past it.
- ``logging.wandb: PROJECT`` logs to a Weights & Biases run per stage (needs ``wandb``; its own
  settings, e.g. ``WANDB_MODE=offline``, apply). The W&B run's id is kept in
  ``<stage dir>/wandb_id`` and passed with ``resume="allow"``, so a stage resumed after a
  preemption goes on logging into the same W&B run; a stage that starts over gets a new one.

A sink asked for whose package is missing is one warning line and no sink: a run never fails
for want of a dashboard. Only rank 0 logs.
"""

from __future__ import annotations

import importlib.util
import logging
import math
import re
import shutil
import uuid
from pathlib import Path
from typing import Protocol

from gwtn_dist.checkpoint import atomic_write_text

log = logging.getLogger("gwtn")

# Record fields that place a record, not measure anything.
POSITION_FIELDS = ("phase_index", "step", "global_step")
_warned: set[str] = set()


class Sink(Protocol):
    def write(self, record: dict) -> None: ...

    def close(self) -> None: ...


def scalars(record: dict) -> dict[str, float]:
    """The record's finite numeric fields, by name (booleans, text and positions left out)."""
    return {k: float(v) for k, v in record.items()
            if k not in POSITION_FIELDS and isinstance(v, (int, float))
            and not isinstance(v, bool) and math.isfinite(v)}


class TensorBoardSink:
    """Scalars into TensorBoard event files, x axis: the record's ``global_step``.

    writer: anything with ``add_scalar(tag, value, step)``, ``flush()`` and ``close()`` (a
    ``torch.utils.tensorboard.SummaryWriter``)."""

    def __init__(self, writer):
        self.writer = writer

    def write(self, record: dict) -> None:
        step = int(record["global_step"])
        for key, value in scalars(record).items():
            self.writer.add_scalar(key, value, step)

    def close(self) -> None:
        self.writer.flush()
        self.writer.close()


class WandbSink:
    """Scalars into a Weights & Biases run (``run.log(values, step=global_step)``)."""

    def __init__(self, run):
        self.run = run

    def write(self, record: dict) -> None:
        self.run.log({**scalars(record), "phase": record.get("phase")},
                     step=int(record["global_step"]))

    def close(self) -> None:
        self.run.finish()


def _warn_once(package: str, key: str) -> None:
    if package not in _warned:
        _warned.add(package)
        log.warning("%s is set but the %s package is not installed; not logging there "
                    "(pip install %s)", key, package, package)


def available(package: str) -> bool:
    return importlib.util.find_spec(package) is not None


WANDB_ID_FILE = "wandb_id"
# W&B run ids: letters, digits, - and _ (no slashes; it builds URLs from them).
_WANDB_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")


def wandb_run_id(stage_dir: Path, resuming: bool) -> str:
    """The W&B run id for the stage in ``stage_dir``: the one stored in its ``wandb_id`` file
    when the stage resumes from a checkpoint, else a new one, stored (atomically) for the
    resume. A stage that starts over gets a new id: its steps start again at the first, which
    the old W&B run would refuse as going back in time."""
    path = stage_dir / WANDB_ID_FILE
    if resuming:
        try:
            stored = path.read_text().strip()
        except FileNotFoundError:  # the run began before ids were stored, or W&B was off
            stored = ""
        if _WANDB_ID.fullmatch(stored):
            return stored
    run_id = uuid.uuid4().hex[:16]
    atomic_write_text(path, run_id + "\n")
    return run_id


def open_sinks(stage_dir: Path, tensorboard: bool, wandb_project: str,
               resume_step: int | None = None) -> list[Sink]:
    """The sinks the config asks for and this machine can serve (rank 0 only).

    resume_step: the stage's global step at its checkpoint when it resumes (TensorBoard
    drops the events logged after it in the interrupted run; W&B goes on in the same run)."""
    sinks: list[Sink] = []
    if tensorboard:
        if available("tensorboard"):
            from torch.utils.tensorboard import SummaryWriter

            if resume_step is None:  # a fresh stage: no curves of an earlier run in its folder
                shutil.rmtree(stage_dir / "tb", ignore_errors=True)
            purge = resume_step + 1 if resume_step is not None else None
            sinks.append(TensorBoardSink(SummaryWriter(str(stage_dir / "tb"),
                                                       purge_step=purge)))
        else:
            _warn_once("tensorboard", "logging.tensorboard")
    if wandb_project:
        if available("wandb"):
            import wandb

            run_id = wandb_run_id(stage_dir, resuming=resume_step is not None)
            run = wandb.init(project=wandb_project, dir=str(stage_dir),
                             name=f"{stage_dir.parent.name}/{stage_dir.name}",
                             group=stage_dir.parent.name, id=run_id, resume="allow")
            sinks.append(WandbSink(run))
        else:
            _warn_once("wandb", "logging.wandb")
    return sinks
