"""Which parameters each imitation phase trains: its own segment fully, lower blocks softly."""

from __future__ import annotations

import pytest
import torch

from gwtn_dist.config import ModelConfig, WideningConfig
from gwtn_dist.models.bridge import Bridges
from gwtn_dist.models.family import build_thin, build_wide
from gwtn_dist.models.resnet import imitation_points
from gwtn_dist.stages.imitate import phase_params
from gwtn_dist.stages.tasks import run_prefix


def ids(params) -> set[int]:
    return {id(p) for p in params}


def module_ids(*modules) -> set[int]:
    return {id(p) for m in modules for p in m.parameters()}


@pytest.fixture
def thin():
    return build_thin(ModelConfig(blocks=[2, 1, 2], inner_widths=[4, 8, 8], stem_width=8))


def test_each_phase_trains_its_segment_and_softly_the_blocks_below(thin):
    points = imitation_points(thin, "stages")
    # Phase 0: stem + layer1 at full lr, nothing below.
    current, lower = phase_params(thin, points, 0, None, 0.1)
    assert ids(current) == module_ids(thin.stem, thin.layer1) and not lower
    # Phase 1: layer2 at full lr; stem + layer1 at the lower multiplier; layer3 untouched.
    current, lower = phase_params(thin, points, 1, None, 0.1)
    assert ids(current) == module_ids(thin.layer2)
    assert ids(lower) == module_ids(thin.stem, thin.layer1)
    current, lower = phase_params(thin, points, 2, None, 0.1)
    assert ids(current) == module_ids(thin.layer3)
    assert ids(lower) == module_ids(thin.stem, thin.layer1, thin.layer2)
    # The classifier is never trained during imitation.
    for k in range(3):
        current, lower = phase_params(thin, points, k, None, 1.0)
        assert not ids(current + lower) & module_ids(thin.fc)


def test_a_zero_multiplier_freezes_the_blocks_below(thin):
    points = imitation_points(thin, "stages")
    current, lower = phase_params(thin, points, 2, None, 0.0)
    assert ids(current) == module_ids(thin.layer3) and lower == []


def test_every_block_points_give_one_block_per_phase(thin):
    points = imitation_points(thin, "blocks")
    current, _ = phase_params(thin, points, 3, None, 0.1)  # layer3.0
    assert ids(current) == module_ids(thin.layer3[0])


def test_pairs_join_the_phase_that_uses_them():
    cfg = ModelConfig(blocks=[1, 1, 1], inner_widths=[4, 4, 4], stem_width=8,
                      widen=WideningConfig(inner_mult=2, boundary_mult=2))
    thin, wide = build_thin(cfg), build_wide(cfg)
    points = imitation_points(thin, "stages")
    bridges = Bridges(thin, wide, points)
    current, lower = phase_params(thin, points, 1, bridges, 0.1)
    p0, p1 = bridges.pair("layer1"), bridges.pair("layer2")
    assert ids([p1.lift, p0.back]) <= ids(current)  # P_1 compares, Q_0 feeds layer2
    assert id(p0.lift) in ids(lower) and id(p1.back) not in ids(current + lower)


def test_run_prefix_applies_passed_pairs_only():
    cfg = ModelConfig(blocks=[1, 1, 1], inner_widths=[4, 4, 4], stem_width=8,
                      widen=WideningConfig(inner_mult=1, boundary_mult=2))
    thin, wide = build_thin(cfg).eval(), build_wide(cfg)
    points = imitation_points(thin, "stages")
    bridges = Bridges(thin, wide, points)
    with torch.no_grad():
        bridges.pair("layer1").back.mul_(0.5)  # Q_0 P_0 = 0.5 I: visible downstream
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        plain = run_prefix(thin, x, 2)
        bridged = run_prefix(thin, x, 2, bridges, {1: "layer1"})
        at_point = run_prefix(thin, x, 1, bridges, {1: "layer1"})
    assert not torch.allclose(plain, bridged)
    assert torch.allclose(at_point, run_prefix(thin, x, 1))  # the point's own pair is not applied
