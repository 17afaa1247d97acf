"""The phases a config's run trains, built on the meta device and traced one step each.

For every phase of every stage (the wide twin; each imitation point; distillation and label
training; every baseline arm of ``arms``) this builds the nets the stage builds (``build_thin``,
``build_wide``, ``Bridges``, the frozen teacher behind ``distributed.teacher.Teacher``), on the
meta device, and runs one training step of the phase's loss through the family's task
(``label_loss``, ``scored``, ``features``, ``normalize``), the imitation loss's reference and
``distillation_loss``, as the stages do, under ``plan.trace``: what the step allocates beyond
the weights (activations kept for the backward, temporaries, the teacher's outputs), and its
FLOPs. Gradients are dropped as soon as they are made (a hook), so the trace measures the
activations alone; the engines' gradient terms are ``plan.states``'s.

The step runs at the phase's own micro-batch (the meta device makes the size free), and the
final evaluation's forward at ``data.eval_batch_size``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from ..config import Config, OptimConfig
from ..data.datasets import dataset_of
from ..distributed.runtime import Runtime
from ..distributed.teacher import Teacher
from ..kernels import select_imitation_mse
from ..models.bridge import Bridges
from ..models.family import needs_bridges
from ..spec import resolve
from ..stages.imitate import parallel_outputs, parallel_params, phase_params, schedule_steps
from ..stages.losses import distillation_loss
from .trace import StepTrace, trace

META = torch.device("meta")


@dataclass
class PhaseWork:
    """One phase, measured: what trains (``sizes`` of every parameter of the module the
    engine wraps, ``trainable`` elements of them), the teacher it runs (``teacher_used``
    parameters of it per step), the traced step at ``micro_batch`` (``step``: activations and
    temporaries; ``targets``: bytes of the teacher's outputs held through the step) and the
    stage's final evaluation (``eval``)."""

    stage: str
    name: str
    steps: int
    optim: OptimConfig
    zero: int
    sizes: list[int]
    trainable: int
    largest_param: int
    largest_module: int
    micro_batch: int
    step: StepTrace
    targets: int = 0
    teacher_used: int = 0
    eval: StepTrace | None = None
    kind: str = "label"  # label, imitate, distill
    holds_teacher: bool = False  # the stage keeps a teacher loaded through this phase
    first_with_teacher: bool = False  # the stage loads its teacher before this phase

    @property
    def params(self) -> int:
        return sum(self.sizes)


@dataclass
class Workload:
    """Every phase of the run, in order, and the teacher's parameters (``teacher_sizes``;
    its largest module in ``teacher_largest``), the thin net's training step at
    ``micro_batch`` (``thin_step``: what step times are scaled from)."""

    phases: list[PhaseWork]
    teacher_sizes: list[int]
    teacher_largest: int
    thin_step: StepTrace
    thin_micro: int
    batch_bytes_per_sample: int
    stages: list[str] = field(default_factory=list)


def largest_module(net: nn.Module) -> int:
    """The most parameter elements one module holds directly (what ZeRO-3 gathers at once)."""
    return max((sum(p.numel() for p in m.parameters(recurse=False)) for m in net.modules()),
               default=0)


def _sizes(modules: list[nn.Module]) -> list[int]:
    return [p.numel() for m in modules for p in m.parameters()]


def _on_meta(x):
    if isinstance(x, dict):
        return {k: v.to(META) for k, v in x.items()}
    return x.to(META)


class Tracer:
    """Builds a config's nets on the meta device and traces their steps. ``dtype``: the
    weights' and the image inputs' dtype in the run (the trace stands in for autocast with
    it too); ``seq_len``: token sequences are cut to it (the shards' length)."""

    def __init__(self, cfg: Config, dtype: torch.dtype, seq_len: int | None):
        self.cfg, self.dtype, self.seq_len = cfg, dtype, seq_len
        self.spec = resolve(cfg)
        self.family, self.task = self.spec.family, self.spec.task
        # Masked-LM's loss is taken at the chosen tokens, a data-dependent share.
        self.selected = dataset_of(cfg).loss_share(cfg)
        self.runtime = Runtime(dtype=dtype)

    def net(self, build: Callable[[], nn.Module]) -> nn.Module:
        with META:
            net = build()
        return net.to(dtype=self.dtype)

    def teacher(self, wide: nn.Module) -> Teacher:
        return Teacher(wide, wide, "replicate", "planned", self.runtime)

    def batch(self, b: int):
        """A (x, y) batch of ``b`` samples on the meta device, as ``task.prepare`` gives it."""
        x, y = self.family.synthetic_batch(self.cfg, b, torch.Generator().manual_seed(0))
        if isinstance(x, dict) and self.seq_len:
            x = {k: v[:, : self.seq_len] for k, v in x.items()}
            y = y[:, : self.seq_len]
        elif torch.is_tensor(x) and x.is_floating_point():
            x = x.to(self.dtype)
        return _on_meta(x), _on_meta(y)

    def step(self, loss: Callable[[object, torch.Tensor], torch.Tensor], trained: list,
             b: int, held: list | None = None) -> tuple[StepTrace, int]:
        """Trace forward and backward of ``loss(x, y)`` at batch ``b``, the gradients of the
        ``trained`` parameters dropped as they are made; returns the trace and the bytes of
        what the loss put in ``held`` (the teacher's outputs it keeps)."""
        x, y = self.batch(b)
        for p in trained:
            p.requires_grad_(True)
        hooks = [p.register_post_accumulate_grad_hook(_drop_grad) for p in trained]
        kept = held if held is not None else []

        def run():
            value = loss(x, y)
            value.backward()

        try:
            result = trace(run, self.selected)
        finally:
            for h in hooks:
                h.remove()
        return result, sum(t.numel() * t.element_size() for t in kept)

    @torch.no_grad()
    def evaluation(self, model: nn.Module, b: int) -> StepTrace:
        """The final evaluation's forward (no gradients) at batch ``b``."""
        x, y = self.batch(b)
        model.eval()
        return trace(lambda: self.task.scored(model, x, y), self.selected)


def _drop_grad(p: torch.Tensor) -> None:
    p.grad = None


def _freeze(*nets: nn.Module | None) -> None:
    for net in nets:
        if net is not None:
            net.requires_grad_(False)


def plan_workload(cfg: Config, world: int, dtype: torch.dtype,
                  seq_len: int | None = None) -> Workload:
    """Every phase of ``cfg``'s run on ``world`` ranks (the stages ``gwtn run`` trains: wide,
    imitate, finetune, then the other arms), traced at each phase's micro-batch."""
    t = Tracer(cfg, dtype, seq_len)
    task = t.task
    per_rank = cfg.data.batch_size // world
    wide = t.net(t.spec.build_wide)
    thin = t.net(t.spec.build_thin)
    teacher = t.teacher(wide)
    _freeze(wide, thin)
    phases: list[PhaseWork] = []
    eval_b = cfg.data.eval_batch_size

    def micro(o: OptimConfig) -> int:
        return per_rank // o.accumulate

    # Stage 1: the wide twin with its task loss.
    o = cfg.wide.optim
    wide_params = list(wide.parameters())
    step, _ = t.step(lambda x, y: task.label_loss(wide, x, y)[0], wide_params, micro(o))
    phases.append(PhaseWork("wide", "wide", cfg.wide.steps, o, cfg.dist.wide_zero_stage,
                            _sizes([wide]), sum(p.numel() for p in wide_params),
                            max(p.numel() for p in wide_params), largest_module(wide),
                            micro(o), step, eval=t.evaluation(wide, eval_b)))
    _freeze(wide)

    thin_step, _ = t.step(lambda x, y: task.label_loss(thin, x, y)[0], list(thin.parameters()),
                          micro(cfg.baseline.optim))
    _freeze(thin)
    phases += _imitation_phases(t, cfg, thin, wide, teacher, micro, eval_b)
    teacher_all = sum(p.numel() for p in wide.parameters())
    imitate_steps = sum(p.steps for p in phases if p.stage == "imitate")

    f = cfg.finetune
    phases += _thin_phases(t, cfg, "finetune", thin, teacher, teacher_all, f.kd_steps,
                           f.label_steps, f.optim, f.distill, micro, eval_b)
    budget = imitate_steps + f.kd_steps + f.label_steps
    baselines = [arm.name for arm in t.spec.arms if not arm.is_method]
    for arm in baselines:
        net = thin
        if arm == "deeper":
            depth = t.family.deeper_depth(cfg)
            net = t.net(lambda depth=depth: t.spec.build_thin(depth))
            _freeze(net)
        b = cfg.baseline
        phases += _thin_phases(t, cfg, arm, net, teacher, teacher_all,
                               budget if arm == "kd" else 0, 0 if arm == "kd" else budget,
                               b.optim, b.distill, micro, eval_b)
    stages = ["wide", "imitate", "finetune", *baselines]
    for stage in stages:
        taught = [p for p in phases if p.stage == stage and p.holds_teacher]
        if taught:
            taught[0].first_with_teacher = True
    x, y = t.batch(1)
    sample = sum(v.numel() * v.element_size() for v in (x.values() if isinstance(x, dict)
                                                         else [x])) + y.numel() * y.element_size()
    return Workload(phases, _sizes([wide]), largest_module(wide), thin_step,
                    micro(cfg.baseline.optim), sample, stages)


def _imitation_phases(t: Tracer, cfg: Config, thin: nn.Module, wide: nn.Module,
                      teacher: Teacher, micro, eval_b: int) -> list[PhaseWork]:
    """Stage 2's phases: one per point (sequential), or the parallel phase and its polish."""
    ic, task = cfg.imitate, t.task
    points = list(t.spec.points)
    ends = [t.family.point_index(thin, p) for p in points]
    bridges = None
    if needs_bridges(cfg.model):
        with META:
            bridges = Bridges(thin, wide, points, t.family)
        bridges = bridges.to(dtype=t.dtype).requires_grad_(False)
    mse = select_imitation_mse("reference", "cpu")  # the fused kernel holds less
    modules = [thin] + ([bridges] if bridges is not None else [])
    sizes = _sizes(modules)
    wide_blocks = [module for _, module in wide.blocks()]
    steps = schedule_steps(ic.steps_per_point, len(points), ic.schedule, ic.parallel_polish_steps)
    o = ic.optim
    b = micro(o)
    thin_eval = t.evaluation(thin, eval_b)

    def point_value(k: int, h: torch.Tensor, target: torch.Tensor, mask) -> torch.Tensor:
        pair = bridges.pair(points[k]) if bridges is not None else None
        if ic.target_norm == "layernorm":
            lifted = pair.lifted(h) if pair is not None else h
            return mse(task.normalize(lifted), task.normalize(target), mask=mask)
        return mse(h, target, weight=pair.lift if pair is not None else None, mask=mask)

    def used(end: int) -> int:
        return sum(p.numel() for blk in wide_blocks[: end + 1] for p in blk.parameters())

    def sequential(k: int, n: int, name: str) -> PhaseWork:
        end = ends[k]
        bridged = {ends[j]: points[j] for j in range(k)}
        current, lower = phase_params(thin, points, ends, k, bridges, ic.lower_lr_mult)
        trained = current + (lower if ic.lower_lr_mult > 0 else [])
        held: list[torch.Tensor] = []

        def loss(x, y):
            mask = task.feature_mask(x)
            target = teacher(x, upto=end)  # (b, C_wide, H, W) or (b, T, D'), fp32, no grad
            held.append(target)
            h = task.features(thin, x, end, bridges, bridged)
            return point_value(k, h, target, mask)

        step, targets = t.step(loss, trained, b, held)
        return PhaseWork("imitate", name, n, o, cfg.dist.student_zero_stage, sizes,
                         sum(p.numel() for p in trained), max(p.numel() for p in trained),
                         max(largest_module(mod) for mod in modules), b, step, targets,
                         used(end), thin_eval, kind="imitate", holds_teacher=True)

    phases = []
    if ic.schedule == "parallel":
        trained = parallel_params(thin, points, ends, bridges)
        held: list[torch.Tensor] = []

        def loss(x, y):
            mask = task.feature_mask(x)
            targets = teacher(x, points=ends)  # K outputs, fp32, no grad
            held.extend(targets)
            outs = parallel_outputs(thin, task, x, targets, points, ends, bridges, t.dtype)
            return sum(point_value(k, outs[k], targets[k], mask) for k in range(len(points)))

        step, targets = t.step(loss, trained, b, held)
        phases.append(PhaseWork("imitate", "imitate/parallel", steps[0], o,
                                cfg.dist.student_zero_stage, sizes,
                                sum(p.numel() for p in trained),
                                max(p.numel() for p in trained),
                                max(largest_module(mod) for mod in modules), b, step, targets,
                                used(ends[-1]), thin_eval, kind="imitate",
                                holds_teacher=True))
        phases += [sequential(k, n, f"imitate/polish/{points[k]}")
                   for k, n in enumerate(steps[1:])]
    else:
        phases += [sequential(k, n, f"imitate/{points[k]}") for k, n in enumerate(steps)]
    _freeze(*modules)
    return phases


def _thin_phases(t: Tracer, cfg: Config, stage: str, net: nn.Module, teacher: Teacher,
                 teacher_all: int, kd_steps: int, label_steps: int, o: OptimConfig,
                 distill, micro, eval_b: int) -> list[PhaseWork]:
    """A thin net's phases (``train_thin``): distillation for ``kd_steps``, then labels."""
    task = t.task
    params = list(net.parameters())
    sizes = _sizes([net])
    common = {"zero": cfg.dist.student_zero_stage, "sizes": sizes,
              "trainable": sum(p.numel() for p in params),
              "largest_param": max(p.numel() for p in params),
              "largest_module": largest_module(net), "micro_batch": micro(o),
              "eval": t.evaluation(net, eval_b)}
    phases = []
    if kd_steps:
        held: list[torch.Tensor] = []

        def kd(x, y):
            logits, targets = task.scored(net, x, y)  # (N, classes), (N,)
            soft, _ = task.scored(teacher, x, y)  # no grad
            held.append(soft)
            return distillation_loss(logits, soft, targets, distill.alpha, distill.temperature)

        step, targets = t.step(kd, params, micro(o), held)
        phases.append(PhaseWork(stage, f"{stage}/distill", kd_steps, o, step=step,
                                targets=targets, teacher_used=teacher_all, kind="distill",
                                holds_teacher=True, **common))
    if label_steps:
        step, _ = t.step(lambda x, y: task.label_loss(net, x, y)[0], params, micro(o))
        # The stage keeps the teacher it distilled from loaded to its end.
        phases.append(PhaseWork(stage, f"{stage}/labels", label_steps, o, step=step,
                                kind="label", holds_teacher=bool(kd_steps), **common))
    _freeze(net)
    return phases
