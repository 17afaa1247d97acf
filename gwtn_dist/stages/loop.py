"""The one training loop: a stage is a list of phases run in order, with exact resume.

Every stage (wide training, each imitation phase, distillation, label training, the baselines)
is a ``Phase``: how many steps, which parameters train at which lr multiplier, and the loss of a
batch. ``run_phases`` takes batches that a background thread made ahead (``data.prefetch``),
steps the engine, logs to ``metrics.jsonl`` (and the dashboards), shows progress, and writes an
atomic checkpoint every ``checkpoint_every`` steps and at each phase end. Losses stay on the
device between flushes (every ``log_every`` steps and before every checkpoint), so the host
waits for the device once per ``log_every`` steps, not every step. A checkpoint holds
everything that decides the rest of the run (weights, optimizer and schedule, stream position,
phase and step), so a resumed run ends with the same weights as an uninterrupted one.

On several ranks each rank trains on its own batch (``data.batches``: a slice of the global
batch, or its own share of the epoch), and the engine averages the gradients. Logged losses
are averaged over ranks; rank 0 writes the files. Mid-phase, the engine's state may be files
of its own under ``stage_dir`` (``Engine.save``: a DeepSpeed checkpoint) that ``checkpoint.pt``
points to, written first, so the pointer never names an incomplete checkpoint; the engine
removes those no checkpoint names (``Engine.prune``). At phase ends ``checkpoint.pt`` holds
consolidated weights, which any world size can resume from.

``run_phases`` is a ``_StageRun``: the stage (resume, the reader, the phases), a phase (its
engine, its steps) and a step (read, forward/backward, step, evaluate, flush, checkpoint) are
its methods; a ``_PhaseRun`` holds the running phase's state.
"""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from .. import checkpoint, metric_sinks, profiling
from ..config import ConfigError, DistConfig, LoggingConfig, OptimConfig, ProfileConfig
from ..data.batches import TrainBatches
from ..data.prefetch import Prefetcher, pinned
from ..distributed import preempt
from ..distributed.engines import Engine, make_engine
from ..distributed.runtime import Runtime, all_reduce_sum, barrier, gather_objects, sum_counts

log = logging.getLogger("gwtn")
LossFn = Callable[[object, torch.Tensor], tuple[torch.Tensor, dict]]


@dataclass
class Phase:
    """One run of the loop with one objective and one schedule.

    groups() returns the parameter groups to train (``{"params", "lr_mult"}``); it is called when
    the phase starts, after ``setup()`` has put modules in train/eval mode and set requires_grad.
    loss(x, y) gets this rank's batch on the device: a normalised, augmented batch
    (b, C, H, W) and labels (b,), or for text {"input_ids", "attention_mask"} and masked-LM
    labels, (b, T) each. module: everything the groups' parameters belong to (what a DeepSpeed
    engine wraps); zero_stage: its ZeRO stage under DeepSpeed.
    """

    name: str
    steps: int
    optim: OptimConfig
    groups: Callable[[], list[dict]]
    loss: LossFn
    module: nn.Module
    setup: Callable[[], None] = lambda: None
    eval_model: nn.Module | None = None
    zero_stage: int = 0


@dataclass
class PhaseResult:
    """A finished phase. breakdown: per rank, the mean ms per region of its sampled steps
    (``profiling.StepBreakdown.summary``; empty when none was sampled)."""

    name: str
    steps: int
    final_loss: float
    wall_s: float
    breakdown: list[dict] | None = None

    def as_dict(self) -> dict:
        out = {"name": self.name, "steps": self.steps, "final_loss": self.final_loss,
               "wall_s": round(self.wall_s, 2)}
        if self.breakdown and any(self.breakdown):
            out["breakdown"] = self.breakdown
        return out


@dataclass
class StepTiming:
    """Host-side times of the steps since the last logged record: no device sync needed
    (on a GPU the host runs ahead, so a logged step time is the pace of the queue)."""

    steps: int = 0
    step_s: float = 0.0
    data_s: float = 0.0
    data_cpu_s: float = 0.0  # CPU time spent making the batches (the prefetch thread's)
    tokens: torch.Tensor | None = None  # this rank's unpadded tokens since the last record (text)

    def record(self, samples_per_step: int, device: torch.device,
               grad_norm: float | None, ranks: int = 1) -> dict:
        """The logged fields (means per step since the last record), then start over. Text
        adds tokens_per_s: this rank's unpadded tokens × ranks over the time (one host read
        per record, on the step that reads the grad norm anyway)."""
        n = max(self.steps, 1)
        out = {"step_s": round(self.step_s / n, 5), "data_s": round(self.data_s / n, 5),
               "data_cpu_s": round(self.data_cpu_s / n, 5),
               "samples_per_s": round(samples_per_step * n / self.step_s, 2)
               if self.step_s > 0 else None,
               "peak_mem_mb": round(profiling.peak_memory_mb(device), 1)}
        if self.tokens is not None and self.step_s > 0:
            out["tokens_per_s"] = round(float(self.tokens) * ranks / self.step_s, 1)
        if grad_norm is not None:
            out["grad_norm"] = grad_norm
        self.steps, self.step_s, self.data_s, self.data_cpu_s, self.tokens = 0, 0.0, 0.0, 0.0, None
        return out


class PhaseResults(list):
    """The finished phases' results, and ``resumes``: where each resume of this stage picked
    up (phase index and name, step), so a stage's record proves it continued, not restarted;
    ``skipped``: the bad training samples every rank's reader skipped, by reason."""

    resumes: list[dict]
    skipped: dict[str, int]


@dataclass
class LoopContext:
    """What a stage's phases share: where to write, what to save, where batches come from.

    rt: the process's place in the job and its engine and precision.
    modules: every module whose state must survive a crash (the students, bridges), by name.
    prepare(x, y) → the loaded batch on the device, as the phases' losses take it.
    evaluate(model) → metrics dict (test accuracy …), called every ``eval_every`` global steps.
    step_offset: thin-net steps already taken before this stage (for accuracy-vs-steps curves).
    prefetch: batches made ahead in a background thread (``data.prefetch``; 0: none).
    tokens(x) → the batch's unpadded tokens (a 0-d device tensor) for tokens/s, or None.
    """

    stage_dir: Path
    modules: dict[str, nn.Module]
    batches: TrainBatches
    device: torch.device
    micro_batch: int
    prepare: Callable[[object, torch.Tensor], tuple]
    checkpoint_every: int
    dist: DistConfig
    rt: Runtime
    progress: bool = True
    evaluate: Callable[[nn.Module], dict] | None = None
    eval_every: int = 0
    step_offset: int = 0
    log_every: int = 20
    profile: ProfileConfig = field(default_factory=ProfileConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    prefetch: int = 2
    tokens: Callable[[object], torch.Tensor | None] | None = None


class MetricsLog:
    """Append-only JSON lines; on resume, lines past the checkpoint are dropped (the file is
    rewritten atomically), and a torn line (a kill or a full disk mid-write) is dropped with a
    warning instead of stopping the resume.

    is_main: whether this process writes the file (rank 0; the others' calls do nothing).
    sinks: the dashboards (``metric_sinks``) that get every record written here, too."""

    def __init__(self, path: Path, is_main: bool = True, sinks: list | None = None):
        self.path = path
        self.is_main = is_main
        self.sinks = sinks or []

    def write(self, record: dict) -> None:
        if not self.is_main:
            return
        try:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")
        except OSError as exc:  # a full disk: name the file (a torn line is dropped on resume)
            raise OSError(exc.errno, exc.strerror, str(self.path)) from exc
        for sink in self.sinks:
            sink.write(record)

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()
        self.sinks = []

    def truncate_after(self, phase_index: int, step: int) -> None:
        if not self.is_main or not self.path.is_file():
            return
        keep, torn = [], 0
        for line in self.path.read_text(errors="replace").splitlines():
            try:
                rec = json.loads(line)
                position = (rec["phase_index"], rec["step"])
            except (ValueError, KeyError, TypeError):
                torn += 1
                continue
            if position <= (phase_index, step):
                keep.append(line)
        if torn:
            log.warning("%s: dropped %d unreadable line(s)", self.path, torn)
        checkpoint.atomic_write_text(self.path, "".join(k + "\n" for k in keep))


class PlainProgress:
    """Progress for logs that are not a terminal (a SLURM output file, a pipe): one plain
    line every ``every_s`` seconds and at the end, instead of tqdm's carriage returns."""

    def __init__(self, name: str, total: int, start: int, every_s: float = 30.0):
        self.name, self.total, self.n, self.every_s = name, total, start, every_s
        self.postfix: dict[str, str] = {}
        self._t0 = self._last = time.monotonic()
        self._n0 = start

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if now - self._last >= self.every_s:
            self._last = now
            self._line(now)

    def set_postfix(self, refresh: bool = False, **values: str) -> None:
        self.postfix = values

    def _line(self, now: float) -> None:
        rate = (self.n - self._n0) / max(now - self._t0, 1e-9)
        left = (self.total - self.n) / rate if rate > 0 else float("nan")
        extra = "".join(f", {k} {v}" for k, v in self.postfix.items())
        log.info("%s: step %d/%d (%.2f step/s, %.0f s left%s)", self.name, self.n, self.total,
                 rate, left, extra)

    def close(self) -> None:
        if self.n > self._n0:
            self._line(time.monotonic())


def _progress_bar(ctx: LoopContext, phase: Phase, start: int) -> tqdm | PlainProgress:
    """tqdm on a terminal; plain periodic log lines otherwise; nothing off rank 0 or with
    ``progress=false``."""
    show = ctx.progress and ctx.rt.is_main
    if show and not sys.stderr.isatty():
        return PlainProgress(phase.name, phase.steps, start)
    return tqdm(total=phase.steps, initial=start, desc=phase.name, unit="step",
                disable=not show, dynamic_ncols=True, mininterval=0.5)


class PendingRecords:
    """The metrics records of the steps since the last flush, whose loss and numeric extras
    (train accuracy, imitation relative error, attention KL: 0-d tensors) are still on the
    device, so a step does not wait for the device to log them.

    ``flush`` brings them all to the host in one transfer, averages them over ranks in one
    all-reduce, together with the stop flag, and returns the finished records. The loop
    flushes every ``log_every`` steps and before every checkpoint, so the device is waited
    for once per ``log_every`` steps and a checkpoint never runs ahead of ``metrics.jsonl``.
    """

    def __init__(self, world_size: int) -> None:
        self.world_size = world_size  # what the summed values are divided by
        self.items: list[tuple[dict, torch.Tensor, dict, list[str]]] = []

    def add(self, record: dict, loss: torch.Tensor, extra: dict) -> None:
        """A step's record (it may still gain fields, e.g. eval scores, until the flush), its
        loss (0-d, on the device) and its extras (their numeric ones are the record's to
        replace)."""
        keys = [k for k, v in extra.items()
                if isinstance(v, (int, float)) or (torch.is_tensor(v) and v.numel() == 1)]
        self.items.append((record, loss.detach().reshape(()), extra, keys))

    def flush(self, stop: bool) -> tuple[list[dict], bool]:
        """The pending records with ``loss`` and the numeric extras as floats averaged over
        ranks, in step order, and whether any rank was asked to stop (``stop``: this rank)."""
        on_device = [t for _, loss, extra, keys in self.items
                     for t in [loss] + [extra[k].detach().reshape(()).to(loss.device)
                                        for k in keys if torch.is_tensor(extra[k])]]
        # The one wait for the device in log_every steps: (n values,) float64 to the host.
        fetched = iter(torch.stack([t.double() for t in on_device]).cpu().tolist()
                       if on_device else [])
        values = [float(stop)]
        for _, _, extra, keys in self.items:
            values.append(next(fetched))
            values += [next(fetched) if torch.is_tensor(extra[k]) else float(extra[k])
                       for k in keys]
        summed = all_reduce_sum(torch.tensor(values, dtype=torch.float64)).tolist()
        mean = iter(v / self.world_size for v in summed[1:])
        out = []
        for record, _, _, keys in self.items:
            record["loss"] = next(mean)
            record.update({k: next(mean) for k in keys})  # in place: the keys keep their order
            out.append(record)
        self.items = []
        return out, summed[0] > 0


def micro_batches(x, y: torch.Tensor, n: int) -> list[tuple]:
    """This rank's batch as ``n`` equal micro-batches along dim 0: x (b, …) or a dict of
    (b, T) tensors, y (b, …) → n × ((b/n, …), (b/n, …)). One micro-batch is the batch itself."""
    if n == 1:
        return [(x, y)]
    size = y.shape[0] // n
    ys = y.split(size)
    if isinstance(x, dict):
        parts = {k: v.split(size) for k, v in x.items()}
        xs = [{k: v[i] for k, v in parts.items()} for i in range(n)]
    else:
        xs = x.split(size)
    return list(zip(xs, ys, strict=True))


def _forward_backward(rt: Runtime, phase: Phase, engine: Engine, x, y: torch.Tensor,
                      device: torch.device) -> tuple[torch.Tensor, dict]:
    """Forward (under the run's autocast) and backward of the step's ``optim.accumulate``
    micro-batches, one after the other, so only one micro-batch's activations are alive.

    Returns the step's loss (the mean of the micro-batches' losses, detached) and its extras
    (numeric ones averaged the same way). The summed gradients are those of the whole batch
    for per-sample mean losses, except through batch-norm statistics (per micro-batch) and
    losses averaged over a varying count (masked-LM tokens: each micro-batch's mean weighs
    the same).
    """
    losses, extras = [], []
    for xm, ym in micro_batches(x, y, phase.optim.accumulate):
        with profiling.region("student_forward"), rt.autocast_context(device):
            loss, extra = phase.loss(xm, ym)
        engine.backward(loss)
        losses.append(loss.detach().float())
        extras.append(extra)
    if len(losses) == 1:
        return losses[0], extras[0]
    extra = dict(extras[-1])
    for key, value in extra.items():
        if torch.is_tensor(value):  # stays on the device: averaged without a host sync
            extra[key] = torch.stack([e[key].detach().float() for e in extras]).mean()
        elif isinstance(value, (int, float)):
            extra[key] = sum(float(e[key]) for e in extras) / len(extras)
    return torch.stack(losses).mean(), extra


def _save(ctx: LoopContext, engine: Engine, stream: dict, phase_index: int, step: int, done: bool,
          recent: list, wall: float, results: PhaseResults) -> None:
    """Write the stage checkpoint (and, mid-phase, the engine's own state) atomically.
    stream: the data stream's position after the last batch trained on."""
    state = {
        "stream": stream,
        "phase_index": phase_index + 1 if done else phase_index,
        "step": 0 if done else step,
        "recent_losses": recent, "phase_wall_s": wall,
        "results": [r.as_dict() for r in results],
        "resumes": results.resumes,
        "world_size": ctx.rt.world_size,
    }
    if not done:  # the engine's files (if any) first: checkpoint.pt never names a torn one
        state["engine"] = engine.save(ctx.stage_dir, phase_index, step)
    if done or not engine.saves_modules:  # consolidated weights, unless the engine's hold them
        state["modules"] = {n: engine.module_state(m) for n, m in ctx.modules.items()}
    failure: OSError | None = None
    if ctx.rt.is_main:
        try:
            checkpoint.atomic_save(state, ctx.stage_dir / "checkpoint.pt", keep_previous=True)
            # Only now that neither checkpoint.pt nor the previous one names them may the
            # engine's older files go.
            engine.prune(ctx.stage_dir, mid_phase=not done)
        except OSError as exc:
            failure = exc
    # Rank 0's outcome reaches every rank (this is also the barrier after the save), so when
    # its write fails the others stop at once instead of waiting out dist.timeout_s later.
    if ctx.rt.rank0_says(failure is not None):
        raise failure or OSError(f"rank 0 could not write {ctx.stage_dir / 'checkpoint.pt'}; "
                                 f"stopping (see rank 0's error)")


def _resume_state(ctx: LoopContext) -> dict | None:
    path = ctx.stage_dir / "checkpoint.pt"
    if not path.is_file():
        return None
    state = checkpoint.load_with_fallback(path)
    if not isinstance(state, dict):
        raise checkpoint.CheckpointError(f"{path} is not a checkpoint of this stage (it holds "
                                         f"a {type(state).__name__}, not a mapping)")
    saved_world = state.get("world_size", 1)
    if "engine" in state and saved_world != ctx.rt.world_size:
        raise ConfigError(
            f"{path} stopped mid-phase on {saved_world} rank(s); its optimizer state (under "
            f"DeepSpeed, its partitions) is bound to that world size, so resume it on "
            f"{saved_world} rank(s); a checkpoint at a phase end resumes on any number"
        )
    return state


def _check_state(state: object, path: Path, phases: list[Phase],
                 modules: dict[str, nn.Module]) -> None:
    """A ``CheckpointError`` naming ``path`` when a readable checkpoint does not describe this
    stage (another stage's, another config's, or crafted): where it stopped must be a step of
    these phases, and it must hold either every module's weights or an engine's state."""
    def refuse(what: str) -> None:
        raise checkpoint.CheckpointError(f"{path} is not a checkpoint of this stage ({what})")

    if not isinstance(state, dict):
        refuse("not a mapping")
    for key, kind in (("stream", dict), ("phase_index", int), ("step", int),
                      ("results", list), ("recent_losses", list)):
        if not isinstance(state.get(key), kind) or isinstance(state.get(key), bool):
            refuse(f"no {key}")
    phase, step = state["phase_index"], state["step"]
    if not 0 <= phase <= len(phases) or (phase < len(phases)
                                         and not 0 <= step < phases[phase].steps):
        refuse(f"it stopped at step {step} of phase {phase}; this stage has "
               f"{[p.steps for p in phases]} steps")
    if "modules" in state:
        if not isinstance(state["modules"], dict) or set(state["modules"]) != set(modules):
            refuse(f"it holds the weights of {sorted(state['modules'])!r}, not of "
                   f"{sorted(modules)!r}" if isinstance(state["modules"], dict) else "no weights")
    elif not isinstance(state.get("engine"), dict) or step == 0:
        refuse("neither weights nor an engine's state")


def run_phases(ctx: LoopContext, phases: list[Phase]) -> PhaseResults:
    """Run ``phases`` in order, resuming from ``stage_dir/checkpoint.pt`` if it exists; the
    results carry where every resume picked up (``resumes``)."""
    return _StageRun(ctx, phases).run()


@dataclass
class _PhaseRun:
    """The state of the phase being run: its engine, the losses of its last logged steps
    (``recent``, for its final loss), its training time so far (``wall``, evaluation left
    out), and what the steps since the last log or flush left (``timing``, ``pending``).
    ``tick``: when the time now being counted began."""

    index: int
    phase: Phase
    engine: Engine
    bar: tqdm | PlainProgress
    breakdown: profiling.StepBreakdown
    pending: PendingRecords
    recent: list[float] = field(default_factory=list)
    wall: float = 0.0
    timing: StepTiming = field(default_factory=StepTiming)
    tick: float = 0.0
    value: float = math.nan  # the latest logged loss


class _StageRun:
    """One call of ``run_phases``: the stage's resume, its phases, each phase's steps.

    A stage: resume (or start afresh), one background reader for every batch the stage has
    left, the phases in order. A phase: an engine, its steps, its end. A step: read, forward
    and backward, optimizer step, maybe evaluate, flush the records, checkpoint, stop.
    """

    def __init__(self, ctx: LoopContext, phases: list[Phase]):
        self.ctx, self.phases, self.rt = ctx, phases, ctx.rt
        self.metrics = MetricsLog(ctx.stage_dir / "metrics.jsonl", ctx.rt.is_main)
        self.results = PhaseResults()
        self.results.resumes, self.results.skipped = [], {}
        self.state: dict | None = None  # the checkpoint resumed from
        self.first_phase, self.first_step = 0, 0
        self.global_step = 0
        self.on_host = ctx.device.type == "cpu"  # the reader thread prepares the batch

    def run(self) -> PhaseResults:
        """The stage's phases from where its checkpoint left off; their results."""
        ctx, rt = self.ctx, self.rt
        if rt.is_main:
            ctx.stage_dir.mkdir(parents=True, exist_ok=True)
        barrier()
        self._resume()
        self.global_step = ctx.step_offset + sum(
            p.steps for p in self.phases[:self.first_phase]) + self.first_step
        self.trace = profiling.Tracer(ctx.profile.trace_start, ctx.profile.trace_steps, rt.rank)
        if rt.is_main:
            self.metrics.sinks = metric_sinks.open_sinks(
                ctx.stage_dir, ctx.logging.tensorboard, ctx.logging.wandb,
                resume_step=self.global_step if self.state is not None else None)
        self.feed = self._prefetcher()
        try:
            for index in range(self.first_phase, len(self.phases)):
                self._run_phase(index)
        finally:
            self.feed.close()
            self.metrics.close()
        self.results.skipped = _skipped_over_ranks(ctx.batches.per_rank, self.feed.skipped)
        if rt.is_main and self.results.skipped:
            log.warning("%s: %d bad training sample(s) skipped (%s)", ctx.stage_dir.name,
                        sum(self.results.skipped.values()),
                        ", ".join(f"{n} {r}" for r, n in sorted(self.results.skipped.items())))
        return self.results

    def _resume(self) -> None:
        """Pick up from ``checkpoint.pt`` if there is one (weights, stream position, results,
        metrics.jsonl cut back to it); else start afresh (an old metrics.jsonl goes)."""
        ctx, phases = self.ctx, self.phases
        self.state = state = _resume_state(ctx)
        if state is None:
            if self.rt.is_main and (ctx.stage_dir / "metrics.jsonl").exists():
                (ctx.stage_dir / "metrics.jsonl").unlink()
            return
        path = ctx.stage_dir / "checkpoint.pt"
        _check_state(state, path, phases, ctx.modules)
        if "modules" in state:  # else the engine's own checkpoint restores them with it
            for name, module in ctx.modules.items():
                checkpoint.load_state(module, state["modules"][name], path)
        try:
            ctx.batches.seek(state["stream"])
            self.results.extend(PhaseResult(**r) for r in state["results"])
        except (KeyError, TypeError, ValueError) as exc:
            raise checkpoint.CheckpointError(f"{path} is not a checkpoint of this stage (its "
                                             f"stream or results: {exc!r})") from None
        self.first_phase, self.first_step = state["phase_index"], state["step"]
        first_phase, first_step = self.first_phase, self.first_step
        name = phases[first_phase].name if first_phase < len(phases) else None
        self.results.resumes = [*state.get("resumes", []), {
            "phase_index": first_phase, "step": first_step, "world_size": self.rt.world_size,
            "phase": name}]
        self.metrics.truncate_after(first_phase, first_step)
        if self.rt.is_main:
            log.info("resuming %s at phase %d (%s), step %d", ctx.stage_dir.name, first_phase,
                     "-" if name is None else name, first_step)

    def _prefetcher(self) -> Prefetcher:
        """The background reader of every (phase, step) this stage has left, in order. On the
        CPU the thread also casts the batch to the run's dtype and memory format; for a GPU it
        pins it, and the training thread starts the asynchronous copy."""
        ctx, phases = self.ctx, self.phases
        keys = ((i, s) for i in range(self.first_phase, len(phases))
                for s in range(self.first_step if i == self.first_phase else 0, phases[i].steps))
        host = (lambda batch: ctx.prepare(*batch)) if self.on_host else \
            pinned if ctx.device.type == "cuda" else (lambda batch: batch)
        return Prefetcher(ctx.batches, keys, host, ctx.prefetch)

    def _run_phase(self, index: int) -> None:
        """Phase ``index``: its engine (restored when resuming mid-phase), its steps, and at
        its end the modules handed back whole."""
        ctx, rt = self.ctx, self.rt
        phase = self.phases[index]
        start = self.first_step if index == self.first_phase else 0
        phase.setup()
        engine = make_engine(rt, phase.module, phase.groups(), phase.optim, phase.steps,
                             zero_stage=phase.zero_stage, dist_cfg=ctx.dist,
                             micro_batch=ctx.micro_batch)
        if rt.is_main:
            engine.record(ctx.stage_dir, phase.name)
        recent, wall = self._engine_resume(engine, index, start)
        run = _PhaseRun(index, phase, engine, _progress_bar(ctx, phase, start),
                        profiling.StepBreakdown(ctx.profile.sample_every, ctx.device),
                        PendingRecords(rt.world_size), recent, wall)
        profiling.use(run.breakdown)
        run.tick = time.perf_counter()
        for step in range(start, phase.steps):
            self._step(run, step)
        run.bar.close()
        self.trace.close()
        profiling.use(None)
        engine.release(ctx.modules)  # whole fp32 modules for whatever comes next
        if rt.is_main:
            log.info("%s: %d steps, loss %.4f, %.1f s", phase.name, phase.steps,
                     self.results[-1].final_loss, self.results[-1].wall_s)

    def _engine_resume(self, engine: Engine, index: int, start: int) -> tuple[list[float], float]:
        """Resuming mid-phase: the engine's state restored, and the phase's recent losses and
        training time so far; else nothing to restore ([], 0.0)."""
        state = self.state
        if state is None or index != self.first_phase or start == 0:
            return [], 0.0
        try:
            engine.load(self.ctx.stage_dir, state["engine"])
        except (KeyError, TypeError, ValueError) as exc:  # another run's optimizer
            raise checkpoint.CheckpointError(
                f"{self.ctx.stage_dir / 'checkpoint.pt'} is not a checkpoint of this stage "
                f"(its optimizer state: {str(exc)[:200]!r})") from None
        return list(state["recent_losses"]), float(state["phase_wall_s"])

    def _step(self, run: _PhaseRun, step: int) -> None:
        """One optimizer step of the phase, then what is due after it: an evaluation, a flush
        of the records, a checkpoint, a stop."""
        ctx, phase = self.ctx, run.phase
        self.trace.at(self.global_step - ctx.step_offset, ctx.stage_dir / "trace", phase.name,
                      run.breakdown)
        run.breakdown.begin_step(step)
        x, y = self._batch(run, step)
        run.timing.data_s += time.perf_counter() - run.tick
        loss, extra = _forward_backward(self.rt, phase, run.engine, x, y, ctx.device)
        logged = (step + 1) % ctx.log_every == 0
        saving = (step + 1) % ctx.checkpoint_every == 0 or step + 1 == phase.steps
        grad_norm = run.engine.step(grad_norm=logged)
        self.global_step += 1
        # The loss and the numeric extras become numbers when the record is flushed.
        record = {"phase": phase.name, "phase_index": run.index, "step": step + 1,
                  "global_step": self.global_step, "loss": None, "lr": run.engine.lr, **extra}
        run.pending.add(record, loss, extra)
        self._maybe_evaluate(run, record)
        # Stop requests: on one process a host flag, read every step; on several ranks they
        # are agreed on in the flush's all-reduce (every log_every steps).
        asked = preempt.asked_here()
        stop = asked and not self.rt.distributed
        if logged or saving or stop:
            if logged:
                record.update(run.timing.record(ctx.micro_batch * self.rt.world_size,
                                                ctx.device, grad_norm, ranks=self.rt.world_size))
            stop = self._flush(run, asked)
        with profiling.region("bookkeeping"):
            run.bar.update(1)
        run.breakdown.end_step()
        self.trace.after_step()
        now = time.perf_counter()
        run.wall += now - run.tick
        run.timing.step_s += now - run.tick
        run.timing.steps += 1
        self._checkpoint(run, step, saving, stop)
        run.tick = time.perf_counter()

    def _batch(self, run: _PhaseRun, step: int) -> tuple:
        """This rank's batch on the device: images (b, C, H, W) and labels (b,), or token ids
        and attention mask (b, T) and masked-LM labels (b, T)."""
        ctx, timing = self.ctx, run.timing
        with profiling.region("data"):
            batch = self.feed.next(run.index, step)
            timing.data_cpu_s += self.feed.cpu_s
            x, y = batch if self.on_host else ctx.prepare(*batch)
            tokens = ctx.tokens(x) if ctx.tokens is not None else None
            if tokens is not None:  # text: a 0-d device tensor, summed without a sync
                timing.tokens = tokens if timing.tokens is None else timing.tokens + tokens
        return x, y

    def _maybe_evaluate(self, run: _PhaseRun, record: dict) -> None:
        """Every ``eval_every`` global steps, the eval scores join the step's record; their
        time counts neither as training time nor as the step's."""
        ctx, phase = self.ctx, run.phase
        if not (ctx.evaluate and phase.eval_model is not None and ctx.eval_every
                and self.global_step % ctx.eval_every == 0):
            return
        run.breakdown.discard_step()
        spent = time.perf_counter() - run.tick  # training time only: not the evaluation
        run.wall, run.timing.step_s = run.wall + spent, run.timing.step_s + spent
        record.update(ctx.evaluate(phase.eval_model))
        phase.setup()
        run.tick = time.perf_counter()

    def _flush(self, run: _PhaseRun, asked: bool) -> bool:
        """The pending records averaged over ranks and written; whether any rank was asked to
        stop (``asked``: this one). Non-finite losses are found here, up to log_every steps
        late (the weights went bad meanwhile, but no checkpoint holds them)."""
        phase = run.phase
        with profiling.region("collectives"):
            done_records, stop = run.pending.flush(asked)
        with profiling.region("bookkeeping"):
            for done_record in done_records:
                run.value = done_record["loss"]
                if not math.isfinite(run.value):
                    raise FloatingPointError(
                        f"{phase.name}: loss became {run.value} at step {done_record['step']}; "
                        f"lower the learning rate ({phase.optim.lr}) or enable grad_clip")
                self.metrics.write(done_record)
            run.recent = (run.recent + [r["loss"] for r in done_records])[-50:]
            run.bar.set_postfix(loss=f"{run.value:.4f}", lr=f"{run.engine.lr:.3g}",
                                refresh=False)
        return stop

    def _checkpoint(self, run: _PhaseRun, step: int, saving: bool, stop: bool) -> None:
        """The checkpoint due after ``step`` (every ``checkpoint_every`` steps and at the
        phase's end, which also finishes its result), and the stop every rank agreed on."""
        ctx, phase = self.ctx, run.phase
        if saving:
            done = step + 1 == phase.steps
            if done:
                self.results.append(PhaseResult(phase.name, phase.steps,
                                                 sum(run.recent) / len(run.recent), run.wall,
                                                 gather_objects(run.breakdown.summary())))
            _save(ctx, run.engine, self.feed.position, run.index, step + 1, done, run.recent,
                  run.wall, self.results)
        if stop:  # every rank saw the same sum, so every rank stops here
            # On several ranks a stop is agreed on only at flushes, and most flushes are
            # checkpoints: stop there too (the checkpoint is written), or never.
            preempt.acknowledge()
            if not saving:
                _save(ctx, run.engine, self.feed.position, run.index, step + 1, False,
                      run.recent, run.wall, self.results)
            raise preempt.Preempted(ctx.stage_dir, phase.name, step + 1)


def _skipped_over_ranks(per_rank: bool, skipped: dict[str, int]) -> dict[str, int]:
    """The skips of the stage's reader(s) (``skipped``: this rank's): summed over ranks when
    each rank reads its own stream (``per_rank``), rank 0's when every rank reads the same
    global stream."""
    if per_rank:
        return sum_counts(skipped)
    return skipped
