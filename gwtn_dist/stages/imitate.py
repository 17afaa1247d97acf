"""Stage 2: warm the thin net up by imitating the wide net, point by point, bottom to top.

Phase k trains the thin blocks between imitation points k−1 and k to minimise
MSE(P_k(S_≤k(x)), stopgrad(B_≤k(x))), where B is the frozen wide net and P_k is the lift of the
linear pair at point k (identity when boundary widths match; for a BERT twin with a wider
hidden size, a lift of each layer output, see ``models/bridge.py``). Blocks below point k−1 train at
``lower_lr_mult`` × lr (soft freeze), blocks above point k are not run. After the last phase the
pairs are merged, so the thin net leaves this stage with exactly its original shape.

The family's task (``stages/tasks.py``; each family's in ``models/<family>/task.py``) says what
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
from pathlib import Path

import torch
from torch import nn

from ..config import Config
from ..distributed.runtime import Runtime
from ..distributed.teacher import load_teacher
from ..kernels import select_imitation_mse
from ..kernels.imitation.backend import describe_run
from ..models.bridge import Bridges, merge_bridges
from ..models.family import (
    build_thin,
    family_for,
    imitation_points,
    needs_bridges,
    point_index,
    shape_meta,
)
from ..profiling import region
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
from .tasks import attention_kl, task_for

STAGE = "imitate"
log = logging.getLogger("gwtn")


def _params(modules: list[nn.Module]) -> list[nn.Parameter]:
    return [p for m in modules for p in m.parameters()]


def phase_params(thin: nn.Module, points: list[str], k: int, bridges: Bridges | None,
                 lower_lr_mult: float) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """The parameters phase ``k`` trains at full lr, and those it trains at ``lower_lr_mult``.

    Full lr: the blocks after point k−1 up to point k, the lift P_k that this point's comparison
    uses, and Q_{k−1}, which feeds those blocks (lifts only: no Q). Lower lr (none if the
    multiplier is 0): every block before them and the pairs already passed. Blocks above point k
    are never trained here.
    """
    blocks = [module for _, module in thin.blocks()]
    ends = [point_index(thin, p) for p in points]
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


def parallel_params(thin: nn.Module, points: list[str],
                    bridges: Bridges | None) -> list[nn.Parameter]:
    """The parameters the parallel schedule trains, all at full lr: every block up to the
    last point, every lift P_k (point k's comparison), and Q_k of every point but the last
    (Q_k feeds segment k+1; nothing runs above the last point)."""
    blocks = [module for _, module in thin.blocks()]
    params = _params(blocks[: point_index(thin, points[-1]) + 1])
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
            if attention:
                outs.append(tuple(t.float() for t in thin(x, upto=ends[0], attention=True)))
            else:
                outs.append(task.features(thin, x, ends[0], None, {}))
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


def imitate(rt: Runtime, cfg: Config, run_dir: Path, teacher_dir: Path | None = None) -> dict:
    """Run stage 2 into ``run_dir/imitate``; needs the wide stage (default ``run_dir/wide``)."""
    stage_dir = run_dir / STAGE
    if stage_done(stage_dir):
        return read_stage(stage_dir)
    teacher_path = require_stage(teacher_dir or run_dir / "wide", "wide")
    check_init(cfg.imitate.init, "imitate.init")
    seed_everything(cfg.seed + 1)
    ctx = loop_context(rt, cfg, stage_dir, {}, stream_tag=2)
    device = ctx.device
    wide = load_teacher(rt, cfg, teacher_path, device)
    thin = build_thin(cfg.model)
    if cfg.imitate.init:  # a resume then overwrites these weights with its checkpoint's
        load_init(thin, cfg.imitate.init, "imitate.init")
    thin = place(rt, thin, cfg, device)
    points = imitation_points(thin, cfg.model)
    ends = [point_index(thin, p) for p in points]  # block index of each point
    bridges = Bridges(thin, wide.module, points).to(device) if needs_bridges(cfg.model) else None
    ctx.modules = {"thin": thin, **({"bridges": bridges} if bridges is not None else {})}
    mse = select_imitation_mse(cfg.imitate.loss_backend, device)
    # Features and targets reach the loss in the compute dtype (bf16/fp16 under autocast); the
    # loss accumulates in float32 itself.
    compute = rt.autocast or rt.dtype
    ic = cfg.imitate
    blocks = [module for _, module in thin.blocks()]
    student = nn.ModuleDict(ctx.modules)  # what a DeepSpeed engine wraps
    task = task_for(cfg)
    # Where a point is read: a ResNet block's output or its sum before the final ReLU.
    site = {"preact": True} if ic.point_site == "preact" else {}

    def point_loss(k: int, h: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
        """Point k's imitation loss of the thin output h against the teacher's target, and
        its relative error (the MSE over the target's variance: 0 = exact imitation, 1 = no
        better than predicting the target's mean; comparable across points). Images:
        h (b, c, H, W) vs target (b, C_wide, H, W); text: (b, T, D) vs (b, T, D')."""
        pair = bridges.pair(points[k]) if bridges is not None else None
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

    def make_phase(k: int, steps: int, name: str) -> Phase:
        end = ends[k]
        lower_blocks = blocks[: ends[k - 1] + 1 if k else 0]
        bridged = {ends[j]: points[j] for j in range(k)}

        def setup() -> None:
            thin.train()
            thin.requires_grad_(False)
            if bridges is not None:
                bridges.requires_grad_(False)
            current, lower = phase_params(thin, points, k, bridges, ic.lower_lr_mult)
            for p in current + lower:
                p.requires_grad_(True)
            if ic.lower_lr_mult == 0:  # truly frozen: BN statistics of lower blocks stay put too
                for m in lower_blocks:
                    m.eval()

        def groups() -> list[dict]:
            current, lower = phase_params(thin, points, k, bridges, ic.lower_lr_mult)
            return [{"params": current, "lr_mult": 1.0},
                    {"params": lower, "lr_mult": ic.lower_lr_mult}]

        def loss(x, y):
            mask = task.feature_mask(x)  # None (images) or (b, T): unpadded tokens count
            extra = {}
            if ic.attention_weight:
                # Layer outputs (b, T, D) and attention maps (b, H, T, T) of the point's layer.
                target, wide_maps = wide(x, upto=end, attention=True)
                h, thin_maps = (t.float() for t in thin(x, upto=end, attention=True))
                kl = attention_kl(wide_maps, thin_maps, mask)
                extra["attention_kl"] = kl.detach()
            else:
                # Images: (b, C_wide, H, W) vs (b, c_thin, H, W); text: (b, T, D) both.
                target = wide(x, upto=end, **site)  # no grad
                h = task.features(thin, x, end, bridges, bridged, **site)
            value, rel = point_loss(k, h, target, mask)
            if ic.attention_weight:
                value = value + ic.attention_weight * kl
            return value, {"point": points[k], "rel_error": rel, **extra}

        return Phase(name, steps, ic.optim, groups, loss, student, setup=setup,
                     zero_stage=cfg.dist.student_zero_stage)

    dtype = rt.dtype  # the thin net's input dtype, as for prepared images

    def make_parallel_phase(steps: int) -> Phase:
        trained = parallel_params(thin, points, bridges)

        def setup() -> None:
            thin.train()
            thin.requires_grad_(False)
            if bridges is not None:
                bridges.requires_grad_(False)
            for p in trained:
                p.requires_grad_(True)

        def groups() -> list[dict]:
            return [{"params": trained, "lr_mult": 1.0}]

        def loss(x, y):
            mask = task.feature_mask(x)  # None (images) or (b, T)
            att = bool(ic.attention_weight)
            # One teacher pass for every point: a tuple of K outputs, (b, C_k, H_k, W_k) or
            # (b, T, D'), float32, no grad (with att also the K layers' maps (b, H, T, T)).
            out = wide(x, points=ends, attention=True) if att else wide(x, points=ends)
            targets, wide_maps = out if att else (out, None)
            total, rels, kls, extra = None, [], [], {"point": "parallel"}
            outs = parallel_outputs(thin, task, x, targets, points, ends, bridges, dtype, att)
            for k, point in enumerate(points):
                h = outs[k]
                if att:
                    h, thin_maps = h
                    kl = attention_kl(wide_maps[k], thin_maps, mask)
                    kls.append(kl.detach())
                value, rel = point_loss(k, h, targets[k], mask)
                if att:
                    value = value + ic.attention_weight * kl
                total = value if total is None else total + value
                rels.append(rel)
                extra[f"rel_error/{point}"] = rel
            extra["rel_error"] = torch.stack(rels).mean()  # the mean over points
            if att:
                extra["attention_kl"] = torch.stack(kls).mean()
            return total, extra

        return Phase(f"{STAGE}/parallel", steps, ic.optim, groups, loss, student, setup=setup,
                     zero_stage=cfg.dist.student_zero_stage)

    steps = schedule_steps(ic.steps_per_point, len(points), ic.schedule,
                           ic.parallel_polish_steps)
    if ic.schedule == "parallel":
        phases = [make_parallel_phase(steps[0])]
        phases += [make_phase(k, n, f"{STAGE}/polish/{points[k]}")
                   for k, n in enumerate(steps[1:])]
    else:
        phases = [make_phase(k, n, f"{STAGE}/{points[k]}") for k, n in enumerate(steps)]
    results = run_phases(ctx, phases)
    rel_errors = final_relative_errors(stage_dir / "metrics.jsonl")
    # The teacher's own score, where its stage folder has one (a teacher handed over as a
    # bare model.pt has none).
    teacher_stage = teacher_path.parent / "stage.json"
    teacher_score = (read_stage(teacher_path.parent).get(task.select_metric)
                     if teacher_stage.is_file() else None)
    health = {"max_relative_error": max(rel_errors.values()),
              "threshold": ic.health_max_error,
              "reached": max(rel_errors.values()) <= ic.health_max_error,
              "metric": task.select_metric, "teacher": teacher_score}
    head = family_for(cfg.model).init_head(cfg, thin, wide, bridges, points[-1])
    if bridges is not None:
        merge_bridges(thin, bridges, skip=[points[-1]] if head == "wide" else [])
    meta = {"stage": STAGE, **shape_meta(cfg.model, wide=False)}
    extra = {"points": points, "relative_error": rel_errors, "head": head,
             "bridges": bridges is not None, "teacher": wide.record(),
             "imitation_loss": describe_run(mse, compute),
             "settings": {"lower_lr_mult": ic.lower_lr_mult, "target_norm": ic.target_norm,
                          "steps_per_point": ic.steps_per_point,
                          "loss_backend": ic.loss_backend, "init_head": ic.init_head,
                          "attention_weight": ic.attention_weight, "schedule": ic.schedule,
                          "parallel_polish_steps": ic.parallel_polish_steps,
                          "channel_reduction": ic.channel_reduction,
                          "point_site": ic.point_site, "optim": ic.optim.name,
                          "lr": ic.optim.lr},
             "health": health}
    record = finish_stage(rt, cfg, run_dir, STAGE, thin, results, meta, extra)
    if rt.is_main:
        log_health(rel_errors, health, record.get(task.select_metric))
    return record


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
