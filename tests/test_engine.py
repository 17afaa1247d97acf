"""The engine seam: learning-rate schedules, per-group multipliers, state round trip."""

from __future__ import annotations

import math

import pytest
import torch

from gwtn_dist.config import OptimConfig
from gwtn_dist.distributed.engines import make_engine
from gwtn_dist.distributed.runtime import Runtime
from gwtn_dist.optim import lr_factor


def test_cosine_with_warmup():
    o = OptimConfig(schedule="cosine", warmup_steps=10, min_lr_ratio=0.1)
    assert lr_factor(0, 110, o) == pytest.approx(0.1)  # 1/10 of the way up
    assert lr_factor(9, 110, o) == pytest.approx(1.0)
    assert lr_factor(10, 110, o) == pytest.approx(1.0)
    assert lr_factor(60, 110, o) == pytest.approx(0.1 + 0.9 * 0.5)
    assert lr_factor(110, 110, o) == pytest.approx(0.1)


def test_multistep_milestones_are_fractions_of_the_phase():
    o = OptimConfig(schedule="multistep", milestones=[0.5, 0.75], gamma=0.1)
    assert lr_factor(49, 100, o) == 1.0
    assert lr_factor(50, 100, o) == pytest.approx(0.1)
    assert lr_factor(80, 100, o) == pytest.approx(0.01)


def test_groups_get_their_multiplier_and_frozen_groups_are_left_out():
    a, b, c = (torch.nn.Parameter(torch.ones(3)) for _ in range(3))
    o = OptimConfig(lr=0.2, momentum=0.0, weight_decay=0.0, schedule="constant")
    engine = make_engine(Runtime(), torch.nn.ParameterList([a, b, c]),
                         [{"params": [a], "lr_mult": 1.0}, {"params": [b], "lr_mult": 0.5},
                          {"params": [c], "lr_mult": 0.0}], o, total_steps=5)
    engine.step(a.sum() + b.sum() + c.sum())
    assert torch.allclose(a, torch.full((3,), 0.8))
    assert torch.allclose(b, torch.full((3,), 0.9))
    assert torch.equal(c, torch.ones(3))


def test_clipping_bounds_the_update():
    p = torch.nn.Parameter(torch.zeros(4))
    o = OptimConfig(lr=1.0, momentum=0.0, weight_decay=0.0, schedule="constant", grad_clip=1.0)
    engine = make_engine(Runtime(), torch.nn.ParameterList([p]), [{"params": [p]}], o,
                         total_steps=1)
    engine.step((p * 100).sum())
    assert math.isclose(p.norm().item(), 1.0, rel_tol=1e-5)


def test_state_round_trip_continues_the_same_trajectory(tmp_path):
    def run(split: bool) -> torch.Tensor:
        torch.manual_seed(0)
        p = torch.nn.Parameter(torch.randn(5))
        o = OptimConfig(lr=0.1, schedule="cosine")
        module = torch.nn.ParameterList([p])
        engine = make_engine(Runtime(), module, [{"params": [p]}], o, total_steps=10)
        for step in range(10):
            if split and step == 4:
                saved = engine.save(tmp_path, 0, 4)
                engine = make_engine(Runtime(), module, [{"params": [p]}], o, total_steps=10)
                engine.load(tmp_path, saved)
            engine.step((p ** 2).sum())
        return p.detach()

    assert torch.equal(run(False), run(True))


def test_nothing_to_train_is_an_error():
    with pytest.raises(ValueError, match="nothing to train"):
        make_engine(Runtime(), torch.nn.Linear(1, 1), [{"params": [], "lr_mult": 1.0}],
                    OptimConfig(), total_steps=1)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_adamw_is_fused_on_cuda():
    from gwtn_dist.optim import build_optimizer

    p = torch.nn.Parameter(torch.ones(3, device="cuda"))
    opt = build_optimizer([{"params": [p]}], OptimConfig(name="adamw", lr=1e-3))
    assert opt.param_groups[0]["fused"] is True
