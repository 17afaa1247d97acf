"""Stage 2: warm the thin net up by imitating the wide net, point by point, bottom to top.

Phase k trains the thin blocks between imitation points k−1 and k to minimise
MSE(P_k(S_≤k(x)), stopgrad(B_≤k(x))), where B is the frozen wide net and P_k is the lift of the
linear pair at point k (identity when boundary widths match). Blocks below point k−1 train at
``lower_lr_mult`` × lr (soft freeze), blocks above point k are not run. After the last phase the
pairs are merged, so the thin net leaves this stage with exactly its original shape.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..config import Config
from ..dist.teacher import Teacher, load_teacher
from ..kernels import select_imitation_mse
from ..models.bridge import Bridges, merge_bridges
from ..models.family import build_thin, needs_bridges, resnet_shape
from ..models.resnet import ResNet, imitation_points, point_block_index
from .common import (
    finish_stage,
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


def run_prefix(model: ResNet, x: torch.Tensor, last: int, bridges: Bridges | None = None,
               bridged: dict[int, str] | None = None) -> torch.Tensor:
    """Run blocks 0..last of ``model`` on x (B, C_in, H, W); returns block ``last``'s output.

    ``bridged`` maps a block index to the point whose pair (Q P) follows that block.
    """
    for i, (_, block) in enumerate(model.blocks()[: last + 1]):
        x = block(x)
        if bridges is not None and bridged and i in bridged and i != last:
            x = bridges.pair(bridged[i])(x)
    return x


def channel_layernorm(t: torch.Tensor) -> torch.Tensor:
    """Normalise (B, C, H, W) over C at each position, no affine (MobileBERT-style targets)."""
    return F.layer_norm(t.permute(0, 2, 3, 1), t.shape[1:2]).permute(0, 3, 1, 2)


def _params(modules: list[nn.Module]) -> list[nn.Parameter]:
    return [p for m in modules for p in m.parameters()]


def phase_params(thin: ResNet, points: list[str], k: int, bridges: Bridges | None,
                 lower_lr_mult: float) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """The parameters phase ``k`` trains at full lr, and those it trains at ``lower_lr_mult``.

    Full lr: the blocks after point k−1 up to point k, the lift P_k that this point's comparison
    uses, and Q_{k−1}, which feeds those blocks. Lower lr (none if the multiplier is 0): every
    block before them and the pairs already passed. Blocks above point k are never trained here.
    """
    blocks = [module for _, module in thin.blocks()]
    ends = [point_block_index(thin, p) for p in points]
    start = ends[k - 1] + 1 if k else 0
    current, lower = _params(blocks[start : ends[k] + 1]), []
    if lower_lr_mult > 0:
        lower = _params(blocks[:start])
    if bridges is not None:
        current.append(bridges.pair(points[k]).lift)
        if k:
            current.append(bridges.pair(points[k - 1]).back)
        if lower_lr_mult > 0:
            lower += [bridges.pair(points[j]).lift for j in range(k)]
            lower += [bridges.pair(points[j]).back for j in range(k - 1)]
    return current, lower


def imitate(cfg: Config, run_dir: Path, teacher_dir: Path | None = None) -> dict:
    """Run stage 2 into ``run_dir/imitate``; needs the wide stage (default ``run_dir/wide``)."""
    stage_dir = run_dir / STAGE
    if stage_done(stage_dir):
        return read_stage(stage_dir)
    teacher_path = require_stage(teacher_dir or run_dir / "wide", "wide")
    seed_everything(cfg.seed + 1)
    ctx = loop_context(cfg, stage_dir, {}, stream_tag=2)
    device = ctx.device
    wide = load_teacher(cfg, teacher_path, device)
    thin = place(build_thin(cfg.model), cfg, device)
    points = imitation_points(thin, cfg.model.imitation_points)
    ends = [point_block_index(thin, p) for p in points]  # block index of each point
    bridges = Bridges(thin, wide.module, points).to(device) if needs_bridges(cfg.model) else None
    ctx.modules = {"thin": thin, **({"bridges": bridges} if bridges is not None else {})}
    mse = select_imitation_mse(cfg.imitate.loss_backend, device)
    ic = cfg.imitate
    blocks = [module for _, module in thin.blocks()]
    student = nn.ModuleDict(ctx.modules)  # what a DeepSpeed engine wraps

    def make_phase(k: int) -> Phase:
        end = ends[k]
        lower_blocks = blocks[: ends[k - 1] + 1 if k else 0]
        pair = bridges.pair(points[k]) if bridges is not None else None
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
            target = wide(x, upto=end)  # (b, C_wide, H, W), no grad
            h = run_prefix(thin, x, end, bridges, bridged).float()  # (b, c_thin, H, W)
            if ic.target_norm == "layernorm":
                lifted = pair.lifted(h) if pair is not None else h
                target = channel_layernorm(target)
                value = mse(channel_layernorm(lifted), target)
            else:
                value = mse(h, target, weight=pair.lift if pair is not None else None)
            # Relative error: the MSE over the variance of the target (0 = exact imitation,
            # 1 = no better than predicting the target's mean), comparable across points.
            rel = value.detach() / target.var().clamp_min(1e-12)
            return value, {"point": points[k], "rel_error": rel.item()}

        return Phase(f"{STAGE}/{points[k]}", ic.steps_per_point, ic.optim, groups, loss,
                     student, setup=setup, zero_stage=cfg.dist.student_zero_stage)

    results = run_phases(ctx, [make_phase(k) for k in range(len(points))])
    rel_errors = final_relative_errors(stage_dir / "metrics.jsonl")
    log.info("imitation relative error per point (0 = exact, 1 = the teacher's mean): %s",
             ", ".join(f"{p} {e:.3f}" for p, e in rel_errors.items()))
    head = init_head(cfg, thin, wide, bridges, points[-1])
    if bridges is not None:
        merge_bridges(thin, bridges, skip=[points[-1]] if head == "wide" else [])
    meta = {"stage": STAGE, "shape": resnet_shape(cfg.model, wide=False).__dict__}
    extra = {"points": points, "relative_error": rel_errors, "head": head,
             "bridges": bridges is not None, "teacher": wide.record(),
             "settings": {"lower_lr_mult": ic.lower_lr_mult, "target_norm": ic.target_norm,
                          "steps_per_point": ic.steps_per_point,
                          "loss_backend": ic.loss_backend, "init_head": ic.init_head}}
    return finish_stage(cfg, run_dir, STAGE, thin, results, meta, extra)


def final_relative_errors(metrics_path: Path, last: int = 20) -> dict[str, float]:
    """Mean relative imitation error over the last ``last`` steps of each point's phase."""
    by_point: dict[str, list[float]] = {}
    for line in metrics_path.read_text().splitlines():
        rec = json.loads(line)
        by_point.setdefault(rec["point"], []).append(rec["rel_error"])
    return {p: round(sum(v[-last:]) / len(v[-last:]), 4) for p, v in by_point.items()}


@torch.no_grad()
def init_head(cfg: Config, thin: ResNet, wide: Teacher, bridges: Bridges | None,
              last_point: str) -> str:
    """Give the thin net the wide net's classifier when its last point imitated the wide output.

    The thin net's last features imitate the wide net's (through P when widths differ), so the
    wide classifier, composed with P, reads them directly: W_thin = W_wide P, b_thin = b_wide.
    Only valid when the last imitation point is the last block; else the head stays as is.
    """
    last_block = len(thin.blocks()) - 1
    if cfg.imitate.init_head != "wide" or point_block_index(thin, last_point) != last_block:
        return "random"
    weight, bias = wide.head()  # (classes, C), (classes,)
    weight = weight.to(thin.fc.weight.device)
    if bridges is not None:
        weight = weight @ bridges.pair(last_point).lift  # (classes, C) @ (C, c)
    thin.fc.weight.copy_(weight)
    thin.fc.bias.copy_(bias)
    return "wide"
