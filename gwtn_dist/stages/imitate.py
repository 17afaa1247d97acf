"""Stage 2: warm the thin net up by imitating the wide net, point by point, bottom to top.

Phase k trains the thin blocks between imitation points k−1 and k to minimise
MSE(P_k(S_≤k(x)), stopgrad(B_≤k(x))), where B is the frozen wide net and P_k is the lift of the
linear pair at point k (identity when boundary widths match; for a BERT twin with a wider
hidden size, a lift of each layer output, see ``models/bridge.py``). Blocks below point k−1 train at
``lower_lr_mult`` × lr (soft freeze), blocks above point k are not run. After the last phase the
pairs are merged, so the thin net leaves this stage with exactly its original shape.

The family's task (``models/task.py``; each family's in ``models/<family>/task.py``) says what
a point's output is and which positions count: a BERT's points are its layer outputs (b, T, D),
compared at unpadded tokens only, and with ``imitate.attention_weight`` the KL between the two
nets' attention maps of the phase's layer is added.

``imitate.schedule: parallel`` replaces the K phases by one: segment k (the blocks after point
k−1 up to point k) runs on Q_{k−1} stopgrad(B_≤k−1(x)), the teacher's output at the point below
mapped down to the thin width (``LinearPair.lowered``), instead of on the thin net's own
output, so every segment trains at once from one teacher pass per batch. The loss is the sum of
the K per-point losses: the segments' parameters are disjoint and their inputs detached, so
each segment's gradient is exactly that of its own sequential objective (a mean would divide
every segment's step by K and change what ``imitate.optim.lr`` means). The stage keeps the
sequential budget: K × (steps_per_point − parallel_polish_steps) parallel steps, then
``parallel_polish_steps`` steps per point of the sequential schedule, K × steps_per_point in
all.
"""

from __future__ import annotations

import json
import logging
from functools import partial
from pathlib import Path

import torch
from torch import nn

from ..distributed.runtime import Runtime
from ..distributed.teacher import load_teacher
from ..kernels import select_imitation_mse
from ..kernels.imitation.backend import describe_run
from ..models.bridge import Bridges, merge_bridges
from ..models.family import needs_bridges
from ..profiling import region
from ..spec import RunSpec
from .common import (
    check_init,
    finish_stage,
    load_init,
    loop_context,
    place,
    read_stage,
    require_stage,
    seed_everything,
    stage_done,
)
from .loop import Phase, run_phases

STAGE = "imitate"
log = logging.getLogger("gwtn")


def _params(modules: list[nn.Module]) -> list[nn.Parameter]:
    return [p for m in modules for p in m.parameters()]


def phase_params(thin: nn.Module, points: list[str], ends: list[int], k: int,
                 bridges: Bridges | None, lower_lr_mult: float
                 ) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """The parameters phase ``k`` trains at full lr, and those it trains at ``lower_lr_mult``.

    Full lr: the blocks after point k−1 up to point k, the lift P_k that this point's comparison
    uses, and Q_{k−1}, which feeds those blocks (lifts only: no Q). Lower lr (none if the
    multiplier is 0): every block before them and the pairs already passed. Blocks above point k
    are never trained here. ``ends``: the block index of each point.
    """
    blocks = [module for _, module in thin.blocks()]
    start = ends[k - 1] + 1 if k else 0
    current, lower = _params(blocks[start : ends[k] + 1]), []
    if lower_lr_mult > 0:
        lower = _params(blocks[:start])
    if bridges is not None:
        current.append(bridges.pair(points[k]).lift)
        if k and not bridges.lift_only:
            current.append(bridges.pair(points[k - 1]).back)
        if lower_lr_mult > 0:
            lower += [bridges.pair(points[j]).lift for j in range(k)]
            if not bridges.lift_only:
                lower += [bridges.pair(points[j]).back for j in range(k - 1)]
    return current, lower


def parallel_params(thin: nn.Module, points: list[str], ends: list[int],
                    bridges: Bridges | None) -> list[nn.Parameter]:
    """The parameters the parallel schedule trains, all at full lr: every block up to the
    last point, every lift P_k (point k's comparison), and Q_k of every point but the last
    (Q_k feeds segment k+1; nothing runs above the last point)."""
    blocks = [module for _, module in thin.blocks()]
    params = _params(blocks[: ends[-1] + 1])
    if bridges is not None:
        params += [bridges.pair(p).lift for p in points]
        if not bridges.lift_only:
            params += [bridges.pair(p).back for p in points[:-1]]
    return params


def segment_starts(ends: list[int]) -> list[int]:
    """The first block of each segment: 0, then the block after each point but the last."""
    return [0] + [e + 1 for e in ends[:-1]]


def schedule_steps(steps_per_point: int, n_points: int, schedule: str,
                   polish: int) -> list[int]:
    """The steps of each phase of stage 2: K phases of ``steps_per_point`` (sequential), or
    one parallel phase of K × (steps_per_point − polish) and K polish phases of ``polish``
    (none if 0). Either way the stage spends K × steps_per_point thin-net steps."""
    if schedule == "sequential":
        return [steps_per_point] * n_points
    return [n_points * (steps_per_point - polish)] + ([polish] * n_points if polish else [])


def parallel_outputs(thin: nn.Module, task, x, targets: tuple[torch.Tensor, ...],
                     points: list[str], ends: list[int], bridges: Bridges | None,
                     dtype: torch.dtype, attention: bool = False) -> list:
    """Every thin segment's output under the parallel schedule, in the forward's dtype:
    segment 0 runs on the batch x, segment k > 0 on the teacher's output at point k−1
    (``targets[k−1]``, without grad), mapped down to the thin width through that point's pair
    where widths differ and cast to ``dtype`` (the thin net's input dtype); never on the thin
    net's own output, so no gradient crosses a segment boundary. Images: (b, c_k, H_k, W_k);
    text: (b, T, D), or with ``attention`` (output, the segment's last layer's maps (b, H, T, T)).
    """
    starts = segment_starts(ends)
    outs = []
    for k in range(len(points)):
        if k == 0:  # the bottom segment starts from the input itself
            outs.append(task.first_segment(thin, x, ends[0], attention))
            continue
        below = targets[k - 1].detach()
        if bridges is not None:
            below = bridges.pair(points[k - 1]).lowered(below)
        outs.append(task.segment(thin, x, starts[k], ends[k], below.to(dtype),
                                 attention=attention))
    return outs


def masked_variance(target: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """The unbiased variance of ``target``'s values, over the positions ``mask`` keeps.

    target (b, T, D) with mask (b, T), or any shape with mask None. Computed with sums rather
    than ``target[mask]`` (a boolean index waits for the device to know its size).
    """
    if mask is None:
        return target.float().var()
    keep = mask.unsqueeze(-1).to(torch.float32)  # (b, T, 1)
    t = target.float()
    n = keep.sum() * t.shape[-1]
    mean = (t * keep).sum() / n
    return ((t - mean) ** 2 * keep).sum() / (n - 1).clamp_min(1)


class Imitation:
    """Stage 2 of one run: the frozen teacher, the thin net and its pairs, and the phases that
    train the thin net to imitate the teacher point by point (``phases``), then what the stage
    records (``finish``)."""

    def __init__(self, rt: Runtime, spec: RunSpec, ctx, teacher_path: Path):
        cfg, device = spec.cfg, ctx.device
        self.rt, self.spec, self.ctx, self.ic = rt, spec, ctx, cfg.imitate
        self.task, self.points = spec.task, list(spec.points)
        self.wide = load_teacher(rt, cfg, spec.build_wide(), teacher_path, device)
        thin = spec.build_thin()
        if self.ic.init:  # a resume then overwrites these weights with its checkpoint's
            load_init(spec.family, thin, self.ic.init, "imitate.init")
        self.thin = place(rt, thin, cfg, device)
        self.ends = [spec.family.point_index(self.thin, p) for p in self.points]  # block indices
        self.bridges = (Bridges(self.thin, self.wide.module, self.points, spec.family).to(device)
                        if needs_bridges(cfg.model) else None)
        ctx.modules = {"thin": self.thin,
                       **({"bridges": self.bridges} if self.bridges is not None else {})}
        self.mse = select_imitation_mse(self.ic.loss_backend, device)
        # Features and targets reach the loss in the compute dtype (bf16/fp16 under autocast);
        # the loss accumulates in float32 itself.
        self.compute = rt.autocast or rt.dtype
        self.blocks = [module for _, module in self.thin.blocks()]
        self.student = nn.ModuleDict(ctx.modules)  # what a DeepSpeed engine wraps
        # Where a point is read: a ResNet block's output or its sum before the final ReLU.
        self.site = {"preact": True} if self.ic.point_site == "preact" else {}
        self.maps = bool(self.ic.attention_weight)  # the family's extra term (BERT attention)

    # -- the phases
    def phases(self) -> list[Phase]:
        """The stage's phases: K sequential phases, or one parallel phase and K polish ones."""
        ic, points = self.ic, self.points
        steps = schedule_steps(ic.steps_per_point, len(points), ic.schedule,
                               ic.parallel_polish_steps)
        if ic.schedule == "parallel":
            return [self.parallel_phase(steps[0])] + [
                self.point_phase(k, n, f"{STAGE}/polish/{points[k]}")
                for k, n in enumerate(steps[1:])]
        return [self.point_phase(k, n, f"{STAGE}/{points[k]}") for k, n in enumerate(steps)]

    def point_loss(self, k: int, h: torch.Tensor, target: torch.Tensor,
                   mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Point k's imitation loss of the thin output h against the teacher's target, and
        its relative error (the MSE over the target's variance: 0 = exact imitation, 1 = no
        better than predicting the target's mean; comparable across points). Images:
        h (b, c, H, W) vs target (b, C_wide, H, W); text: (b, T, D) vs (b, T, D')."""
        ic, task, mse, compute = self.ic, self.task, self.mse, self.compute
        pair = self.bridges.pair(self.points[k]) if self.bridges is not None else None
        h, target = h.to(compute), target.to(compute)  # no-ops but for BERT's fp32 layer norms
        with region("imitation_loss"):
            if ic.target_norm == "layernorm":
                lifted = pair.lifted(h) if pair is not None else h
                target = task.normalize(target).to(compute)  # autocast's layer norm: fp32
                value = mse(task.normalize(lifted).to(compute), target, mask=mask)
            else:
                value = mse(h, target, weight=pair.lift if pair is not None else None,
                            mask=mask)
        # A 0-d tensor: the loop fetches it with the loss, in one transfer.
        rel = value.detach() / masked_variance(target.detach(), mask).clamp_min(1e-12)
        if ic.channel_reduction == "sum":  # the mean over elements × C: summed over channels
            value = value * target.shape[task.channel_dim]
        return value, rel

    def point_phase(self, k: int, steps: int, name: str) -> Phase:
        """Phase k of the sequential schedule (or point k's polish after the parallel one)."""
        return Phase(name, steps, self.ic.optim, partial(self._point_groups, k),
                     partial(self._point_loss, k), self.student,
                     setup=partial(self._point_setup, k),
                     zero_stage=self.spec.cfg.dist.student_zero_stage)

    def _point_setup(self, k: int) -> None:
        self.thin.train()
        self.thin.requires_grad_(False)
        if self.bridges is not None:
            self.bridges.requires_grad_(False)
        current, lower = phase_params(self.thin, self.points, self.ends, k, self.bridges,
                                      self.ic.lower_lr_mult)
        for p in current + lower:
            p.requires_grad_(True)
        if self.ic.lower_lr_mult == 0:  # truly frozen: BN statistics of lower blocks stay put
            for m in self.blocks[: self.ends[k - 1] + 1 if k else 0]:
                m.eval()

    def _point_groups(self, k: int) -> list[dict]:
        current, lower = phase_params(self.thin, self.points, self.ends, k, self.bridges,
                                      self.ic.lower_lr_mult)
        return [{"params": current, "lr_mult": 1.0},
                {"params": lower, "lr_mult": self.ic.lower_lr_mult}]

    def _point_loss(self, k: int, x, y):
        mask = self.task.feature_mask(x)  # None (images) or (b, T): unpadded tokens count
        bridged = {self.ends[j]: self.points[j] for j in range(k)}
        # Images: (b, C_wide, H, W) vs (b, c_thin, H, W); text: (b, T, D) both; the family's
        # extra term (a BERT's attention-map KL) or None.
        target, h, extra_term = self.task.imitation_outputs(
            self.wide, self.thin, x, self.ends[k], self.bridges, bridged, self.site, self.maps)
        value, rel = self.point_loss(k, h, target, mask)
        extra = {}
        if extra_term is not None:
            value = value + self.ic.attention_weight * extra_term
            extra["attention_kl"] = extra_term.detach()
        return value, {"point": self.points[k], "rel_error": rel, **extra}

    def parallel_phase(self, steps: int) -> Phase:
        """Every segment at once, each fed the teacher's output below it."""
        trained = parallel_params(self.thin, self.points, self.ends, self.bridges)
        return Phase(f"{STAGE}/parallel", steps, self.ic.optim,
                     lambda: [{"params": trained, "lr_mult": 1.0}], self._parallel_loss,
                     self.student, setup=partial(self._parallel_setup, trained),
                     zero_stage=self.spec.cfg.dist.student_zero_stage)

    def _parallel_setup(self, trained: list[nn.Parameter]) -> None:
        self.thin.train()
        self.thin.requires_grad_(False)
        if self.bridges is not None:
            self.bridges.requires_grad_(False)
        for p in trained:
            p.requires_grad_(True)

    def _parallel_loss(self, x, y):
        mask = self.task.feature_mask(x)  # None (images) or (b, T)
        att, ends = self.maps, self.ends
        # One teacher pass for every point: a tuple of K outputs, (b, C_k, H_k, W_k) or
        # (b, T, D'), float32, no grad (with att also the K layers' maps (b, H, T, T)).
        out = self.wide(x, points=ends, attention=True) if att else self.wide(x, points=ends)
        targets, wide_maps = out if att else (out, None)
        total, rels, kls, extra = None, [], [], {"point": "parallel"}
        outs = parallel_outputs(self.thin, self.task, x, targets, self.points, ends,
                                self.bridges, self.rt.dtype, att)
        for k, point in enumerate(self.points):
            h = outs[k]
            if att:
                h, thin_maps = h
                kl = self.task.maps_loss(wide_maps[k], thin_maps, mask)
                kls.append(kl.detach())
            value, rel = self.point_loss(k, h, targets[k], mask)
            if att:
                value = value + self.ic.attention_weight * kl
            total = value if total is None else total + value
            rels.append(rel)
            extra[f"rel_error/{point}"] = rel
        extra["rel_error"] = torch.stack(rels).mean()  # the mean over points
        if att:
            extra["attention_kl"] = torch.stack(kls).mean()
        return total, extra

    # -- the stage's record
    def health(self, rel_errors: dict[str, float], teacher_path: Path) -> dict:
        """Whether the warm start reached the teacher, and the teacher's own score where its
        stage folder has one (a teacher handed over as a bare model.pt has none)."""
        metric = self.task.select_metric
        teacher_stage = teacher_path.parent / "stage.json"
        teacher_score = (read_stage(teacher_path.parent).get(metric)
                         if teacher_stage.is_file() else None)
        worst = max(rel_errors.values())
        return {"max_relative_error": worst, "threshold": self.ic.health_max_error,
                "reached": worst <= self.ic.health_max_error, "metric": metric,
                "teacher": teacher_score}

    def settings(self) -> dict:
        ic = self.ic
        return {"lower_lr_mult": ic.lower_lr_mult, "target_norm": ic.target_norm,
                "steps_per_point": ic.steps_per_point,
                "loss_backend": ic.loss_backend, "init_head": ic.init_head,
                "attention_weight": ic.attention_weight, "schedule": ic.schedule,
                "parallel_polish_steps": ic.parallel_polish_steps,
                "channel_reduction": ic.channel_reduction,
                "point_site": ic.point_site, "optim": ic.optim.name, "lr": ic.optim.lr}

    def finish(self, run_dir: Path, teacher_path: Path, results: list) -> dict:
        """Start the head from the teacher's, merge the pairs, save and score the net, and say
        whether the warm start reached the teacher."""
        spec, thin, bridges, points = self.spec, self.thin, self.bridges, self.points
        rel_errors = final_relative_errors(run_dir / STAGE / "metrics.jsonl")
        health = self.health(rel_errors, teacher_path)
        head = spec.family.init_head(spec.cfg, thin, self.wide, bridges, points[-1])
        if bridges is not None:
            merge_bridges(thin, bridges, skip=[points[-1]] if head == "wide" else [])
        meta = {"stage": STAGE, **spec.shape_meta(wide=False)}
        extra = {"points": points, "relative_error": rel_errors, "head": head,
                 "bridges": bridges is not None, "teacher": self.wide.record(),
                 "imitation_loss": describe_run(self.mse, self.compute),
                 "settings": self.settings(), "health": health}
        record = finish_stage(self.rt, spec, run_dir, STAGE, thin, results, meta, extra)
        if self.rt.is_main:
            log_health(rel_errors, health, record.get(self.task.select_metric))
        return record


def imitate(rt: Runtime, spec: RunSpec, run_dir: Path, teacher_dir: Path | None = None) -> dict:
    """Run stage 2 into ``run_dir/imitate``; needs the wide stage (default ``run_dir/wide``)."""
    cfg = spec.cfg
    stage_dir = run_dir / STAGE
    if stage_done(stage_dir):
        return read_stage(stage_dir)
    teacher_path = require_stage(teacher_dir or run_dir / "wide", "wide")
    check_init(cfg.imitate.init, "imitate.init")
    seed_everything(cfg.seed + 1)
    ctx = loop_context(rt, spec, stage_dir, {}, stream_tag=2)
    stage = Imitation(rt, spec, ctx, teacher_path)
    results = run_phases(ctx, stage.phases())
    return stage.finish(run_dir, teacher_path, results)


def log_health(rel_errors: dict[str, float], health: dict, score: float | None) -> None:
    """Say whether the warm start reached the teacher: each point's relative error, and the
    thin net's validation score after imitation beside the teacher's; a warning when a point
    stays above ``imitate.health_max_error``."""
    errors = ", ".join(f"{p} {e:.3f}" for p, e in rel_errors.items())
    log.info("imitation relative error per point (0 = exact, 1 = the teacher's mean): %s",
             errors)
    metric, teacher = health["metric"].replace("_", " "), health["teacher"]
    if score is not None and teacher is not None:
        log.info("after imitation: %s %.4f, the teacher's %.4f (gap %+.4f)", metric, score,
                 teacher, score - teacher)
    if not health["reached"]:
        worst = max(rel_errors, key=rel_errors.get)
        log.warning("the warm start did not reach the teacher (%s: relative error %.3f > %g, "
                    "imitate.health_max_error); the method cannot be judged from this run",
                    worst, rel_errors[worst], health["threshold"])


def final_relative_errors(metrics_path: Path, last: int = 20) -> dict[str, float]:
    """Mean relative imitation error of each point over the last ``last`` steps of the last
    phase that measured it (its sequential or polish phase, else the parallel phase, whose
    records hold every point's as ``rel_error/<point>``), in the order points first appear."""
    by_point: dict[str, dict[str, list[float]]] = {}  # point → phase → errors
    for line in metrics_path.read_text().splitlines():
        rec = json.loads(line)
        if rec["point"] == "parallel":
            found = {k.removeprefix("rel_error/"): v for k, v in rec.items()
                     if k.startswith("rel_error/")}
        else:
            found = {rec["point"]: rec["rel_error"]}
        for point, value in found.items():
            by_point.setdefault(point, {}).setdefault(rec["phase"], []).append(value)
    final = {p: list(phases.values())[-1][-last:] for p, phases in by_point.items()}
    return {p: round(sum(v) / len(v), 4) for p, v in final.items()}
