"""Where a training step's time goes: wall time per region, measured on sampled steps.

The training loop marks a step's parts with ``region(name)``; the teacher, the imitation loss
and the engines mark theirs the same way. Outside a sampled step a region costs one attribute
check, so the breakdown does not slow the run. On a sampled step every region boundary first
waits for the device (``torch.cuda.synchronize`` on CUDA; nothing to wait for on CPU), so each
region's time is the device time of its work, and regions nest: a region's time excludes the
regions inside it (the teacher's forward inside a loss is counted once, as the teacher's).

While a ``torch.profiler`` trace runs (``profile.trace_start``), every region is also a
``record_function`` range, so the trace shows the same names.

The regions, in the order of a step:

- ``data``: waiting for the next batch and moving it to the device;
- ``student_forward``: the thin (or wide) net's forward, with the task or distillation loss;
- ``teacher_forward``: the frozen wide net's forward (imitation and distillation);
- ``imitation_loss``: the imitation MSE (the fused kernel or its reference);
- ``backward``: the backward pass (under DeepSpeed, with its gradient reduction);
- ``optimizer``: clipping, the optimizer step and the schedule;
- ``collectives``: the loop's flush (every ``log_every`` steps and before a checkpoint): the
  pending losses to the host and their all-reduce over ranks with the stop flag;
- ``bookkeeping``: metrics records, progress bar.
"""

from __future__ import annotations

import resource
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

REGIONS = ("data", "student_forward", "teacher_forward", "imitation_loss", "backward",
           "optimizer", "collectives", "bookkeeping")


class StepBreakdown:
    """Per-region times over the sampled steps of one phase.

    sample_every: time every N-th step (0: never). device: the training device (CUDA
    synchronises at region boundaries on sampled steps).
    """

    def __init__(self, sample_every: int, device: torch.device, trace: bool = False):
        self.sample_every, self.trace = sample_every, trace
        self.cuda = device.type == "cuda"
        self.active = False
        self.sampled = 0
        self.step_s = 0.0
        self.totals = dict.fromkeys(REGIONS, 0.0)
        self._stack: list[list] = []  # [name, start, time of nested regions]
        self._step = dict.fromkeys(REGIONS, 0.0)  # this step's regions, added at its end
        self._step_start = 0.0

    def _sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def begin_step(self, step: int) -> None:
        """Start step ``step`` (0-based in its phase); it is timed if it is a sampled one."""
        self.active = self.sample_every > 0 and (step + 1) % self.sample_every == 0
        if self.active:
            self._step = dict.fromkeys(REGIONS, 0.0)
            self._sync()
            self._step_start = time.perf_counter()

    def end_step(self) -> None:
        if self.active:
            self._sync()
            self.step_s += time.perf_counter() - self._step_start
            for name, spent in self._step.items():
                self.totals[name] += spent
            self.sampled += 1
            self.active = False

    def discard_step(self) -> None:
        """Leave this step out (an evaluation or a save ran inside it)."""
        self.active = False

    @contextmanager
    def region(self, name: str) -> Iterator[None]:
        if not self.active:
            if self.trace:
                with torch.profiler.record_function(name):
                    yield
            else:
                yield
            return
        self._sync()
        self._stack.append([name, time.perf_counter(), 0.0])
        try:
            if self.trace:
                with torch.profiler.record_function(name):
                    yield
            else:
                yield
        finally:
            self._sync()
            _, start, nested = self._stack.pop()
            spent = time.perf_counter() - start
            self._step[name] += spent - nested
            if self._stack:
                self._stack[-1][2] += spent

    def summary(self) -> dict:
        """``{"sampled_steps", "step_ms", "regions": {name: mean ms per step}}`` (empty
        when no step was sampled)."""
        if not self.sampled:
            return {}
        per = 1000.0 / self.sampled
        return {"sampled_steps": self.sampled, "step_ms": round(self.step_s * per, 3),
                "regions": {k: round(v * per, 3) for k, v in self.totals.items()}}


_current: StepBreakdown | None = None


def use(breakdown: StepBreakdown | None) -> None:
    """Make ``breakdown`` the one ``region`` reports to (None: regions cost nothing)."""
    global _current
    _current = breakdown


@contextmanager
def region(name: str) -> Iterator[None]:
    """Mark a part of the training step (one of ``REGIONS``)."""
    if _current is None or not (_current.active or _current.trace):
        yield
        return
    with _current.region(name):
        yield


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory of this process so far: CUDA memory allocated on a GPU, else the resident
    set size (Linux reports ``ru_maxrss`` in KiB)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class Tracer:
    """A ``torch.profiler`` trace of a stage's steps ``start … start+steps-1``
    (1-based; ``start`` 0: none), cut at a phase end, one Chrome trace file per phase and rank.
    """

    def __init__(self, start: int, steps: int, rank: int):
        self.start, self.steps, self.rank = start, steps, rank
        self.left = 0
        self._prof: torch.profiler.profile | None = None
        self._path: Path | None = None
        self._breakdown: StepBreakdown | None = None

    def at(self, stage_step: int, folder: Path, phase: str, breakdown: StepBreakdown) -> None:
        """Before step ``stage_step + 1`` of the stage (in ``phase``): start the trace if due."""
        due = self.start and self._prof is None and \
            self.start <= stage_step + 1 < self.start + self.steps
        if not due:
            return
        self.left = self.start + self.steps - (stage_step + 1)
        folder.mkdir(parents=True, exist_ok=True)
        self._path = folder / f"{phase.replace('/', '-')}-rank{self.rank}.json"
        self._breakdown, breakdown.trace = breakdown, True
        self._prof = torch.profiler.profile(record_shapes=False)
        self._prof.__enter__()

    def after_step(self) -> None:
        if self._prof is not None:
            self.left -= 1
            if self.left <= 0:
                self.close()
                self.start = 0  # done

    def close(self) -> None:
        """Stop a running trace and write it (at its last step or the phase end)."""
        if self._prof is None:
            return
        self._prof.__exit__(None, None, None)
        self._prof.export_chrome_trace(str(self._path))
        self._breakdown.trace = False
        self._prof = None
