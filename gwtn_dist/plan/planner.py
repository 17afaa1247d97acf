"""``gwtn plan``: what every stage of a run needs on each rank of a layout, before it runs.

For a config, a layout (nodes × ranks per node, each rank a GPU of ``memory`` bytes, or CPU
ranks sharing a node's memory) and optionally a measured throughput, the plan gives per stage
and phase, per rank:

- the trained net's parameters, gradients and optimizer states under the phase's engine, ZeRO
  stage and precision (``plan.states``);
- the teacher's bytes, sharded or replicated by the rule ``dist.teacher: auto`` applies at run
  time (``distributed.teacher.choose_mode``, called here with the planned sizes);
- activations and the imitation targets held, measured by tracing the phase's step on the
  meta device at its micro-batch (``plan.workload``), and the final evaluation's forward;
- the moments a stage holds more for a while (building the engine, loading the teacher
  whole before it is sharded, the consolidated copy at a phase end, the evaluation), each
  an event; a stage's peak is its largest event;
- on a CPU, the process's own floor (libraries, data readers), measured by ``plan.probe``;
- the micro-batch and accumulation behind the global batch, the bytes sent per step, and a
  projected time per stage from a thin-net throughput (``gwtn bench step`` CSV, or declared),
  scaled by the traced FLOPs of each step; the teacher's cost in thin-net steps.

A layout where a stage's peak plus the reserve exceeds a rank's memory does not fit: the plan
names the stage and what to change (accumulation, ZeRO stage, the teacher's placement, more
ranks).
"""

from __future__ import annotations

import csv
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..config import Config, ConfigError, optim_sections
from ..distributed.runtime import precision_dtypes, resolve_precision
from ..distributed.teacher import choose_mode
from .states import (
    ALLREDUCE_BUCKET,
    MAX_LIVE,
    PERSISTENCE,
    PREFETCH,
    REDUCE_BUCKET,
    SUB_GROUP,
    Engine,
    comm_bytes,
    state_bytes_per_param,
    teacher_bytes,
    teacher_load_bytes,
    trained_states,
    update_temp_bytes,
)
from .workload import PhaseWork, Workload, plan_workload

GiB = 2**30
MiB = 2**20
# CUDA context, NCCL's buffers and the caching allocator's slack, kept free on every GPU (the
# allocator's peak, which the plan predicts, does not include them): an estimate, not measured.
DEFAULT_RESERVE = 2 * GiB


@dataclass
class Layout:
    """Where the run goes: ``nodes`` × ``per_node`` ranks; ``device`` ``cuda`` (each rank a GPU
    of ``memory`` bytes) or ``cpu`` (the node's ``memory`` shared by its ranks); ``reserve``
    bytes per rank kept free; ``runtime`` bytes a CPU rank's process needs before any net
    (``plan.probe``; 0 on a GPU, where it is host memory), ``runtime_early`` what it needs
    before its first training step (the floor under building nets and loading the teacher;
    default ``runtime``)."""

    nodes: int
    per_node: int
    device: str
    memory: int
    reserve: int = DEFAULT_RESERVE
    runtime: int = 0
    runtime_early: int | None = None

    @property
    def world(self) -> int:
        return self.nodes * self.per_node

    @property
    def per_rank(self) -> int:
        """The memory one rank may use."""
        return self.memory if self.device == "cuda" else self.memory // self.per_node


@dataclass
class Throughput:
    """The thin net's training throughput on one rank: ``samples_per_s`` at ``batch``
    samples per step, measured (``source``: a ``gwtn bench step`` CSV) or declared."""

    samples_per_s: float
    batch: int
    source: str


@dataclass
class PhasePlan:
    """One phase on one rank: the terms (bytes), the events that add up to its peak, the
    micro-batch, the bytes sent per step and the projected seconds per step."""

    stage: str
    name: str
    steps: int
    engine: str
    micro_batch: int
    accumulate: int
    terms: dict[str, int]
    events: dict[str, dict[str, int]]  # each moment's bytes, by what holds them
    comm_bytes: int
    flops: int
    optimizer: str = "sgd"  # optim.name
    step_s: float | None = None

    @property
    def peak(self) -> int:
        return max(sum(parts.values()) for parts in self.events.values())

    @property
    def peak_event(self) -> str:
        return max(self.events, key=lambda name: sum(self.events[name].values()))


@dataclass
class Plan:
    """The whole plan: the layout, the choices made (engine, precision, teacher placement),
    every phase, and what the teacher costs."""

    config: str
    layout: Layout
    engine: str
    precision: str
    teacher_mode: str
    teacher_reason: str
    phases: list[PhasePlan]
    throughput: Throughput | None
    teacher_cost: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    eval_batch: int = 0  # data.eval_batch_size

    def stages(self) -> dict[str, list[PhasePlan]]:
        out: dict[str, list[PhasePlan]] = {}
        for p in self.phases:
            out.setdefault(p.stage, []).append(p)
        return out

    def stage_peak(self, stage: str) -> PhasePlan:
        """The phase of ``stage`` with the largest peak."""
        return max(self.stages()[stage], key=lambda p: p.peak)

    def misfits(self) -> list[PhasePlan]:
        """Phases whose peak plus the reserve exceed a rank's memory."""
        room = self.layout.per_rank - self.layout.reserve
        return [p for p in self.phases if p.peak > room]

    def as_dict(self) -> dict:
        out = {"config": self.config, "layout": {**asdict(self.layout),
                                                  "world": self.layout.world,
                                                  "per_rank_memory": self.layout.per_rank},
               "engine": self.engine, "precision": self.precision,
               "teacher": {"mode": self.teacher_mode, "reason": self.teacher_reason},
               "throughput": asdict(self.throughput) if self.throughput else None,
               "teacher_cost": self.teacher_cost, "notes": self.notes,
               "fits": not self.misfits(), "stages": {}}
        for stage, phases in self.stages().items():
            worst = self.stage_peak(stage)
            out["stages"][stage] = {
                "peak_bytes": worst.peak, "peak_event": worst.peak_event,
                "peak_phase": worst.name,
                "headroom_bytes": self.layout.per_rank - self.layout.reserve - worst.peak,
                "steps": sum(p.steps for p in phases),
                "projected_s": (sum(p.steps * p.step_s for p in phases)
                                if all(p.step_s is not None for p in phases) else None),
                "phases": [{**{k: v for k, v in asdict(p).items()}, "peak_bytes": p.peak,
                            "peak_event": p.peak_event} for p in phases]}
        return out


def read_throughput(value: str, batch: int) -> Throughput:
    """``--throughput``: a ``gwtn bench step`` CSV (its median ``framework_ms`` per step of
    ``batch`` samples) or a number of samples per second per rank."""
    try:
        return Throughput(float(value), batch, "declared")
    except ValueError:
        pass
    path = Path(value)
    if not path.is_file():
        raise ConfigError(f"--throughput: {value} is neither a number of samples/s nor a "
                          f"`gwtn bench step` CSV")
    with open(path, newline="") as f:
        rows = {r.get("round"): r for r in csv.DictReader(f)}
    row = rows.get("median") or next(iter(rows.values()), None)
    try:
        ms = float(row["framework_ms"])
    except (TypeError, KeyError, ValueError):
        raise ConfigError(f"--throughput: {path} has no framework_ms column (write it with "
                          f"`gwtn bench step`)") from None
    return Throughput(batch / (ms / 1000), batch, str(path))


def parse_bytes(text: str, key: str) -> int:
    """``80GB``, ``80GiB``, ``24G``, ``512MiB`` or a number of bytes (GB counts as GiB: GPUs
    are sold so)."""
    units = {"": 1, "k": 2**10, "m": MiB, "g": GiB, "t": 2**40}
    t = text.strip().lower().removesuffix("b").removesuffix("i")
    unit = t[-1] if t and t[-1] in units else ""
    try:
        value = float(t[: len(t) - len(unit)])
    except ValueError:
        raise ConfigError(f"{key}: {text!r} is not a size such as 80GB") from None
    if value <= 0:
        raise ConfigError(f"{key}: must be positive, got {text!r}")
    return int(value * units[unit])


def _ds(cfg: Config, key: str, default: int) -> int:
    return int(cfg.dist.deepspeed.get("zero_optimization", {}).get(key, default))


def engine_for(cfg: Config, layout: Layout, zero: int, weight_bytes: int,
               autocast: bool, kind: str) -> Engine:
    return Engine(kind=kind, zero=zero, weight_bytes=weight_bytes, autocast=autocast,
                  world=layout.world, cuda=layout.device == "cuda",
                  reduce_bucket=_ds(cfg, "reduce_bucket_size", REDUCE_BUCKET),
                  allreduce_bucket=int(cfg.dist.deepspeed.get("allreduce_bucket_size",
                                                              ALLREDUCE_BUCKET)),
                  persistence=_ds(cfg, "stage3_param_persistence_threshold", PERSISTENCE),
                  prefetch=_ds(cfg, "stage3_prefetch_bucket_size", PREFETCH),
                  sub_group=_ds(cfg, "sub_group_size", SUB_GROUP),
                  max_live=_ds(cfg, "stage3_max_live_parameters", MAX_LIVE))


def make_plan(cfg: Config, layout: Layout, *, config_name: str = "",
              throughput: Throughput | None = None, bandwidth: float = 25e9,
              seq_len: int | None = None) -> Plan:
    """The plan of ``cfg`` on ``layout`` (see the module's docstring). ``bandwidth``: bytes per
    second a rank sends at (collectives are assumed not to overlap compute: an upper bound)."""
    world = layout.world
    if cfg.data.batch_size % world:
        raise ConfigError(f"data.batch_size: the global batch {cfg.data.batch_size} does not "
                          f"split evenly over {world} ranks; choose a multiple of {world}")
    kind = "deepspeed" if world > 1 or cfg.dist.engine == "deepspeed" else "torch"
    device = torch.device(layout.device)
    precision = resolve_precision(cfg, kind, device)
    weights, autocast = precision_dtypes(cfg, kind, precision)
    w = torch.finfo(weights).bits // 8
    per_rank = cfg.data.batch_size // world
    for key, o in optim_sections(cfg):
        if per_rank % o.accumulate:
            raise ConfigError(f"{key}.accumulate: a rank's batch of {per_rank} does not split "
                              f"into {o.accumulate} equal micro-batches")
    # The trace stands in for autocast with the low precision (the activations' dtype).
    trace_dtype = weights if autocast is None else autocast
    work = plan_workload(cfg, world, trace_dtype, seq_len)
    teacher_total = sum(work.teacher_sizes)
    free = layout.per_rank - layout.reserve
    mode, reason = choose_mode(cfg.dist.teacher, teacher_total * w, free,
                               cfg.dist.teacher_memory_fraction, world)
    phases = [_phase_plan(cfg, layout, work, p, kind, w, autocast is not None, mode, per_rank,
                          first=i == 0 or work.phases[i - 1].stage != p.stage)
              for i, p in enumerate(work.phases)]
    plan = Plan(config_name, layout, kind, precision, mode, reason, phases, throughput,
                eval_batch=cfg.data.eval_batch_size)
    if throughput is not None:
        _project_times(plan, work, throughput, bandwidth)
    plan.teacher_cost = _teacher_cost(cfg, plan, work)
    if layout.device == "cuda":
        plan.notes.append("device memory as the CUDA caching allocator counts it (its peak); "
                          f"{layout.reserve / GiB:.1f} GiB per GPU kept free for the CUDA "
                          "context, NCCL and fragmentation")
    if autocast is not None:
        plan.notes.append("autocast: activations traced in the low precision")
    return plan


def _phase_plan(cfg: Config, layout: Layout, work: Workload, p: PhaseWork, kind: str, w: int,
                autocast: bool, mode: str, per_rank: int, first: bool) -> PhasePlan:
    """Phase ``p`` on one rank of ``layout``; ``first``: the first phase of its stage."""
    e = engine_for(cfg, layout, p.zero, w, autocast, kind)
    o = p.optim
    k = state_bytes_per_param(o.name, o.momentum)
    temp = update_temp_bytes(o.name, p.trainable, p.largest_param,
                             nesterov=o.nesterov and o.momentum > 0,
                             weight_decay=o.weight_decay,
                             fused=layout.device == "cuda")
    s = trained_states(e, p.sizes, p.trainable, k, temp, p.largest_module)
    held, running = (teacher_bytes(e, work.teacher_sizes, mode, work.teacher_largest,
                                   p.teacher_used) if p.holds_teacher else (0, 0))
    cpu = layout.device == "cpu"
    base = layout.runtime if cpu else 0
    early = (layout.runtime if layout.runtime_early is None else layout.runtime_early) \
        if cpu else 0
    floor = early if first else base  # a stage builds its nets before its first step
    batch = work.batch_bytes_per_sample * per_rank  # a rank's inputs and labels
    data = batch * (cfg.data.prefetch + 2) if cpu else batch
    acts = max(p.step.peak - p.targets, 0)
    model = 4 * p.params  # a net is built in fp32 before an engine takes it
    terms = {"runtime": base, "data": data, "params": s.params, "grads": s.grads,
             "optimizer": s.optimizer, "teacher": held, "activations": acts,
             "targets": p.targets}
    persistent = {"runtime": base, "data": data, "params": s.params, "grads": s.grads,
                  "optimizer": s.optimizer, "teacher": held}
    events = {
        "step": {**persistent, "activations": acts, "targets": p.targets,
                 "engine buffers": s.backward, "teacher gathered": running},
        "reduce": {**persistent, "gradient reduction": s.reduce},
        "update": {**persistent, "optimizer step": s.update},
        # The consolidated copy at the phase end is made in host memory, one parameter at a
        # time gathered whole on the device.
        "save": {**persistent, "consolidated copy": 4 * p.largest_param if not cpu
                 else 4 * p.params},
        "eval": {"runtime": base, "data": data, "net": model, "teacher": held,
                 "activations": p.eval.peak if p.eval else 0},
        "build": {"runtime": floor, "data": data, "teacher": held,
                  "net": model if first or cpu else s.params, "engine setup": s.build},
    }
    if p.holds_teacher and p.first_with_teacher:
        # The teacher is built and loaded whole on every rank (on the host; on a GPU it is
        # then moved there whole), before it is sharded; the thin net of a distillation is
        # built before it.
        student = model if p.kind != "imitate" else 0
        events["teacher load"] = (
            {"runtime": floor, "data": data, "net": student,
             "teacher built and read": teacher_load_bytes(sum(work.teacher_sizes), w)}
            if cpu else {"net": student, "teacher whole": w * sum(work.teacher_sizes)})
    events = {name: {k: v for k, v in parts.items() if v} for name, parts in events.items()}
    totals = {name: sum(parts.values()) for name, parts in events.items()}
    terms["transient"] = max(0, max(totals.values()) - totals["step"])
    micro = per_rank // o.accumulate
    steps_comm = comm_bytes(e, p.trainable, p.params, p.teacher_used, mode)
    per_micro = e.zero >= 2 and kind == "deepspeed"
    comm = steps_comm * (o.accumulate if per_micro else 1)
    return PhasePlan(p.stage, p.name, p.steps, f"{kind} ZeRO-{p.zero}" if kind == "deepspeed"
                     else "torch", micro, o.accumulate, terms, events, comm,
                     p.step.flops * o.accumulate, o.name)


def _project_times(plan: Plan, work: Workload, tp: Throughput, bandwidth: float) -> None:
    """Seconds per step of every phase: the thin net's step at the measured throughput,
    scaled by the traced FLOPs per sample, plus the bytes sent at ``bandwidth``."""
    thin_per_sample = work.thin_step.flops / work.thin_micro
    seconds_per_sample = 1 / tp.samples_per_s  # of the thin net's training step
    for p in plan.phases:
        per_sample = p.flops / (p.micro_batch * p.accumulate)
        compute = (p.micro_batch * p.accumulate) * seconds_per_sample * per_sample \
            / thin_per_sample
        p.step_s = compute + p.comm_bytes / bandwidth


def _teacher_cost(cfg: Config, plan: Plan, work: Workload) -> dict:
    """Stage 1 in thin-net step equivalents (FLOPs per sample, same global batch), the
    method's thin-net budget beside it, and what the teacher's forwards add to the steps of
    imitation and distillation."""
    thin = work.thin_step.flops / work.thin_micro
    wide = next(p for p in plan.phases if p.stage == "wide")
    wide_per_sample = wide.flops / (wide.micro_batch * wide.accumulate)
    equivalents = cfg.wide.steps * wide_per_sample / thin
    budget = sum(p.steps for p in plan.phases if p.stage in ("imitate", "finetune"))
    taught = [p for p in plan.phases if p.stage in ("imitate", "finetune")]
    method_equiv = sum(p.steps * p.flops / (p.micro_batch * p.accumulate) / thin
                       for p in taught)
    out = {"wide_step_in_thin_steps": round(wide_per_sample / thin, 2),
           "stage1_thin_step_equivalents": round(equivalents),
           "method_thin_steps": budget,
           "method_thin_step_equivalents": round(method_equiv),
           "stage1_over_method_budget": round(equivalents / max(budget, 1), 2)}
    wide_time = sum(p.steps * p.step_s for p in plan.phases
                    if p.stage == "wide" and p.step_s is not None)
    if wide_time:
        thin_s = work.thin_micro / plan.throughput.samples_per_s \
            * (cfg.data.batch_size // plan.layout.world) / work.thin_micro
        out["stage1_projected_s"] = round(wide_time)
        out["stage1_in_thin_steps_by_time"] = round(wide_time / thin_s)
    return out


def headroom_line(plan: Plan) -> str | None:
    """The one line refusing a layout where a stage does not fit: the worst phase, what holds
    its peak, and what to change for every stage that does not fit; None when all fit."""
    misfits = plan.misfits()
    if not misfits:
        return None
    worst = max(misfits, key=lambda p: p.peak)
    room = plan.layout.per_rank - plan.layout.reserve
    where = "GPU" if plan.layout.device == "cuda" else "CPU rank"
    parts = sorted(((v, k) for k, v in worst.events[worst.peak_event].items()), reverse=True)
    biggest = ", ".join(f"{k} {v / GiB:.1f}" for v, k in parts[:3])
    per_stage: dict[str, PhasePlan] = {}
    for p in misfits:  # each stage's worst phase
        if p.stage not in per_stage or p.peak > per_stage[p.stage].peak:
            per_stage[p.stage] = p
    changes = []
    for p in per_stage.values():
        change = suggestion(plan, p)
        if change not in changes:
            changes.append(change)
    others = [s for s in per_stage if s != worst.stage]
    also = f" ({', '.join(others)} too)" if others else ""
    return (f"plan: {worst.stage} ({worst.name}) needs {worst.peak / GiB:.1f} GiB per rank at "
            f"its {worst.peak_event} ({biggest} GiB) but a {where} has "
            f"{room / GiB:.1f} GiB after the {plan.layout.reserve / GiB:.1f} GiB reserve{also}; "
            f"{'; '.join(changes)}")


def suggestion(plan: Plan, p: PhasePlan) -> str:
    """What would make phase ``p`` fit, by what dominates its peak: a smaller micro-batch
    (accumulation) for activations, a smaller evaluation batch, DeepSpeed's buffer sizes,
    the teacher sharded, a higher ZeRO stage, or more ranks."""
    room = plan.layout.per_rank - plan.layout.reserve
    parts = p.events[p.peak_event]
    over = p.peak - room
    acts = parts.get("activations", 0) + parts.get("targets", 0)
    if p.peak_event == "step" and acts > over:
        # Activations and targets scale with the micro-batch.
        a = next((a for a in range(2, p.micro_batch + 1)
                  if p.micro_batch % a == 0 and acts - acts / a > over), None)
        if a is not None:
            return (f"set {_stage_key(p.stage)}.accumulate={p.accumulate * a} (micro-batch "
                    f"{p.micro_batch // a}; activations and targets are {acts / GiB:.1f} GiB)")
    if p.peak_event == "eval" and acts > over:
        b = max(1, int(plan.eval_batch * (acts - over) / acts))
        return f"set data.eval_batch_size={b}"
    top = max(parts, key=parts.get)
    zero_cfg = "dist.deepspeed.zero_optimization"
    if top == "engine buffers" and p.engine.endswith(("-1", "-2", "-3")):
        return (f"set {zero_cfg}.reduce_bucket_size={int(5e7)} (DeepSpeed allocates its "
                f"gradient bucket whole)")
    if top == "teacher gathered":
        return f"set {zero_cfg}.stage3_max_live_parameters={int(1e7)}"
    if top == "teacher" and plan.teacher_mode == "replicate" and plan.layout.world > 1:
        return "set dist.teacher=shard"
    zero = int(p.engine.rsplit("-", 1)[-1]) if "ZeRO" in p.engine else 0
    highest = 3 if p.stage == "wide" else 2
    zero_key = "dist.wide_zero_stage" if p.stage == "wide" else "dist.student_zero_stage"
    if top in ("params", "grads", "optimizer") and plan.layout.world > 1 and zero < highest:
        if p.optimizer == "lamb":  # LAMB's trust ratio needs whole parameters: ZeRO-0 only
            return (f"set {_stage_key(p.stage)}.name=adamw and {zero_key}={highest} (LAMB "
                    f"runs at ZeRO-0 only; or use more ranks)")
        return f"set {zero_key}={highest} (or use more ranks)"
    return "use more ranks (or ranks with more memory)"


def _stage_key(stage: str) -> str:
    return {"wide": "wide.optim", "imitate": "imitate.optim",
            "finetune": "finetune.optim"}.get(stage, "baseline.optim")


def _gib(n: int) -> str:
    return f"{n / GiB:.2f}"


def table(plan: Plan) -> str:
    """The plan as Markdown: one row per phase (every rank alike), GiB per rank."""
    lay = plan.layout
    head = (f"Plan for {plan.config or 'the config'} on {lay.nodes} node(s) × {lay.per_node} "
            f"{'GPU' if lay.device == 'cuda' else 'CPU rank'}(s) "
            f"({lay.per_rank / GiB:.1f} GiB per rank, {lay.reserve / GiB:.1f} GiB kept free): "
            f"{plan.engine}, {plan.precision}, teacher {plan.teacher_mode} "
            f"({plan.teacher_reason}). GiB per rank (every rank alike).")
    cols = ["stage / phase", "engine", "micro×acc", "params", "grads", "optim", "teacher",
            "activ.", "targets", "runtime+data", "peak (event)", "headroom", "comm/step",
            "time"]
    lines = [head, "", "| " + " | ".join(cols) + " |", "|---|---|" + "---:|" * (len(cols) - 2)]
    room = lay.per_rank - lay.reserve
    for p in plan.phases:
        t = p.terms
        time = f"{p.steps * p.step_s / 3600:.1f} h" if p.step_s is not None else "-"
        lines.append("| " + " | ".join([
            p.name, p.engine, f"{p.micro_batch}×{p.accumulate}", _gib(t["params"]),
            _gib(t["grads"]), _gib(t["optimizer"]), _gib(t["teacher"]), _gib(t["activations"]),
            _gib(t["targets"]), _gib(t["runtime"] + t["data"]),
            f"{_gib(p.peak)} ({p.peak_event})", _gib(room - p.peak),
            f"{p.comm_bytes / GiB:.2f}", time]) + " |")
    cost = plan.teacher_cost
    lines += ["", (f"Teacher's cost: a wide step = {cost['wide_step_in_thin_steps']} thin steps "
              f"(FLOPs); stage 1 = {cost['stage1_thin_step_equivalents']:,} thin-net step "
              f"equivalents, {cost['stage1_over_method_budget']}× the method's thin-net budget "
              f"of {cost['method_thin_steps']:,} steps (whose imitation and distillation steps "
              f"cost {cost['method_thin_step_equivalents']:,} thin-step equivalents with the "
              f"teacher's forwards).")]
    if "stage1_projected_s" in cost:
        lines.append(f"Projected stage 1: {cost['stage1_projected_s'] / 3600:.1f} h "
                     f"(= {cost['stage1_in_thin_steps_by_time']:,} thin steps by time; "
                     f"throughput {plan.throughput.samples_per_s:.0f} samples/s per rank, "
                     f"{plan.throughput.source}).")
    lines += [f"Note: {n}." for n in plan.notes]
    return "\n".join(lines)
