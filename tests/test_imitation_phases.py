"""Which parameters each imitation phase trains: its own segment fully, lower blocks softly;
under the parallel schedule, what each segment runs on and what the schedule spends."""

from __future__ import annotations

import json

import pytest
import torch

from gwtn_dist.config import Config
from gwtn_dist.models.bert.net import attention_bias
from gwtn_dist.models.bert.net import imitation_points as bert_points
from gwtn_dist.models.bert.task import TextTask
from gwtn_dist.models.bridge import Bridges
from gwtn_dist.models.family import build_thin, build_wide, family_for
from gwtn_dist.models.resnet.config import ResNetModelConfig as ModelConfig
from gwtn_dist.models.resnet.config import ResNetWidening
from gwtn_dist.models.resnet.net import imitation_points, point_block_index
from gwtn_dist.models.resnet.task import ImageTask, run_prefix
from gwtn_dist.stages.imitate import (
    final_relative_errors,
    parallel_outputs,
    parallel_params,
    phase_params,
    schedule_steps,
    segment_starts,
)
from tests.conftest import REPO
from tests.test_bert import batch, tiny


def point_ends(thin, points: list[str]) -> list[int]:
    """The block index of each imitation point."""
    return [family_for(thin).point_index(thin, p) for p in points]


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
    current, lower = phase_params(thin, points, point_ends(thin, points), 0, None, 0.1)
    assert ids(current) == module_ids(thin.stem, thin.layer1) and not lower
    # Phase 1: layer2 at full lr; stem + layer1 at the lower multiplier; layer3 untouched.
    current, lower = phase_params(thin, points, point_ends(thin, points), 1, None, 0.1)
    assert ids(current) == module_ids(thin.layer2)
    assert ids(lower) == module_ids(thin.stem, thin.layer1)
    current, lower = phase_params(thin, points, point_ends(thin, points), 2, None, 0.1)
    assert ids(current) == module_ids(thin.layer3)
    assert ids(lower) == module_ids(thin.stem, thin.layer1, thin.layer2)
    # The classifier is never trained during imitation.
    for k in range(3):
        current, lower = phase_params(thin, points, point_ends(thin, points), k, None, 1.0)
        assert not ids(current + lower) & module_ids(thin.fc)


def test_a_zero_multiplier_freezes_the_blocks_below(thin):
    points = imitation_points(thin, "stages")
    current, lower = phase_params(thin, points, point_ends(thin, points), 2, None, 0.0)
    assert ids(current) == module_ids(thin.layer3) and lower == []


def test_every_block_points_give_one_block_per_phase(thin):
    points = imitation_points(thin, "blocks")
    current, _ = phase_params(thin, points, point_ends(thin, points), 3, None, 0.1)  # layer3.0
    assert ids(current) == module_ids(thin.layer3[0])


def test_pairs_join_the_phase_that_uses_them():
    cfg = ModelConfig(blocks=[1, 1, 1], inner_widths=[4, 4, 4], stem_width=8,
                      widen=ResNetWidening(inner_mult=2, boundary_mult=2))
    thin, wide = build_thin(cfg), build_wide(cfg)
    points = imitation_points(thin, "stages")
    bridges = Bridges(thin, wide, points, family_for(thin))
    current, lower = phase_params(thin, points, point_ends(thin, points), 1, bridges, 0.1)
    p0, p1 = bridges.pair("layer1"), bridges.pair("layer2")
    assert ids([p1.lift, p0.back]) <= ids(current)  # P_1 compares, Q_0 feeds layer2
    assert id(p0.lift) in ids(lower) and id(p1.back) not in ids(current + lower)


def test_run_prefix_applies_passed_pairs_only():
    cfg = ModelConfig(blocks=[1, 1, 1], inner_widths=[4, 4, 4], stem_width=8,
                      widen=ResNetWidening(inner_mult=1, boundary_mult=2))
    thin, wide = build_thin(cfg).eval(), build_wide(cfg)
    points = imitation_points(thin, "stages")
    bridges = Bridges(thin, wide, points, family_for(thin))
    with torch.no_grad():
        bridges.pair("layer1").back.mul_(0.5)  # Q_0 P_0 = 0.5 I: visible downstream
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        plain = run_prefix(thin, x, 2)
        bridged = run_prefix(thin, x, 2, bridges, {1: "layer1"})
        at_point = run_prefix(thin, x, 1, bridges, {1: "layer1"})
    assert not torch.allclose(plain, bridged)
    assert torch.allclose(at_point, run_prefix(thin, x, 1))  # the point's own pair is not applied


# The parallel schedule (imitate.schedule=parallel).


def _bridged_twins():
    cfg = ModelConfig(blocks=[1, 1, 1], inner_widths=[4, 4, 4], stem_width=8,
                      widen=ResNetWidening(inner_mult=2, boundary_mult=2))
    thin, wide = build_thin(cfg).train(), build_wide(cfg).eval()
    points = imitation_points(thin, "stages")
    return thin, wide, points, Bridges(thin, wide, points, family_for(thin))


def test_parallel_segments_run_on_the_teachers_bridged_output_not_their_own():
    thin, wide, points, bridges = _bridged_twins()
    ends = [point_block_index(thin, p) for p in points]
    starts = segment_starts(ends)
    assert starts == [0, ends[0] + 1, ends[1] + 1]
    x = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        targets = wide(x, points=ends)  # the teacher's outputs at every point, one pass
        own = run_prefix(thin, x, ends[1], bridges, {ends[0]: points[0]})  # thin's own input
    seen = {}
    for k in (1, 2):  # what the first block of each upper segment receives
        block = thin.blocks()[starts[k]][1]
        block.register_forward_pre_hook(lambda m, args, k=k: seen.__setitem__(k, args[0]))
    assert [t.shape[1] for t in targets] == [32, 32, 32]  # wide boundary width C = 2 c
    outs = parallel_outputs(thin, ImageTask(Config()), x, targets, points, ends, bridges,
                            torch.float32)
    for k in (1, 2):
        expected = torch.einsum("cC,bChw->bchw", bridges.pair(points[k - 1]).back,
                                targets[k - 1])  # Q_{k-1} · teacher output at point k−1
        assert torch.allclose(seen[k], expected, atol=1e-6)
    assert not torch.allclose(seen[2], own, atol=1e-3)  # not the thin net's own output
    # Segment 2's loss reaches its own blocks and Q_1 (which feeds it), but nothing below
    # or in the teacher.
    outs[2].pow(2).mean().backward()
    assert thin.layer3[0].conv1.weight.grad is not None
    assert bridges.pair(points[1]).back.grad is not None
    assert all(p.grad is None for m in (thin.stem, thin.layer1, thin.layer2)
               for p in m.parameters())
    assert bridges.pair(points[1]).lift.grad is None
    assert all(p.grad is None for p in wide.parameters())
    assert [o.shape[1] for o in outs] == [16, 16, 16]  # the thin widths c


def test_parallel_bert_segments_start_from_the_teachers_layer_output():
    cfg = tiny()
    cfg.widen.boundary_mult = 2
    thin, wide = build_thin(cfg).eval(), build_wide(cfg).eval()
    points = bert_points(thin)
    ends = list(range(1, len(points) + 1))
    bridges = Bridges(thin, wide, points, family_for(thin))
    x = batch([12, 7, 3])
    with torch.no_grad():
        targets, maps = wide(x, points=ends, attention=True)
        outs = parallel_outputs(thin, TextTask(Config()), x, targets, points, ends, bridges,
                                torch.float32, attention=True)
        # Layer 2 of the thin net run by hand on P₁⁺ · (the wide layer-1 output).
        pinv = torch.linalg.pinv(bridges.pair(points[1]).lift)  # (D, D')
        h = targets[1] @ pinv.t()
        expected, _ = thin.layer[2](h, attention_bias(x["attention_mask"], h.dtype))
    assert torch.allclose(outs[2][0], expected, atol=1e-5)
    assert outs[2][1].shape == maps[2].shape  # (b, H, T, T) of the same layer in both nets
    # P P⁺ t is t's projection onto P's range: where P h = t exactly, P⁺ recovers h.
    thin_h = torch.randn(3, 12, cfg.hidden)
    lifted = bridges.pair(points[0]).lifted(thin_h)
    assert torch.allclose(bridges.pair(points[0]).lowered(lifted), thin_h, atol=1e-4)


def test_parallel_trains_every_segment_and_the_pairs_that_feed_or_compare():
    thin, _, points, bridges = _bridged_twins()
    trained = ids(parallel_params(thin, points, point_ends(thin, points), bridges))
    assert module_ids(thin.stem, thin.layer1, thin.layer2, thin.layer3) <= trained
    assert not trained & module_ids(thin.fc)
    lifts = {id(bridges.pair(p).lift) for p in points}
    backs = {id(bridges.pair(p).back) for p in points[:-1]}
    assert lifts | backs <= trained and id(bridges.pair(points[-1]).back) not in trained


def test_both_schedules_spend_the_same_thin_net_steps():
    assert schedule_steps(15, 3, "sequential", 0) == [15, 15, 15]
    assert schedule_steps(15, 3, "parallel", 0) == [45]
    assert schedule_steps(15, 3, "parallel", 5) == [30, 5, 5, 5]
    for polish in (0, 1, 14):
        assert sum(schedule_steps(15, 4, "parallel", polish)) == 4 * 15


def test_parallel_polish_is_checked(tmp_path):
    from gwtn_dist.config import ConfigError, load_config

    yaml = REPO / "configs" / "tiny_cpu.yaml"
    with pytest.raises(ConfigError, match="schedule=parallel"):
        load_config(yaml, ["imitate.parallel_polish_steps=2"])
    with pytest.raises(ConfigError, match="< imitate.steps_per_point"):
        load_config(yaml, ["imitate.schedule=parallel", "imitate.parallel_polish_steps=15"])
    with pytest.raises(ConfigError, match="schedule"):
        load_config(yaml, ["imitate.schedule=both"])


def test_final_relative_errors_read_the_last_phase_that_measured_each_point(tmp_path):
    path = tmp_path / "metrics.jsonl"
    recs = [{"phase": "imitate/parallel", "point": "parallel", "rel_error": 0.5,
             "rel_error/a": 0.4, "rel_error/b": 0.6}] * 3
    recs += [{"phase": "imitate/polish/a", "point": "a", "rel_error": 0.1}] * 2
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    # a: its polish phase; b: no polish phase logged yet, so the parallel phase's.
    assert final_relative_errors(path) == {"a": 0.1, "b": 0.6}


def test_a_scaled_budget_scales_the_polish_and_keeps_it_below_each_points_steps():
    from gwtn_dist.compare import scaled
    from gwtn_dist.config import load_config

    cfg = load_config(REPO / "configs" / "tiny_cpu.yaml",
                      ["imitate.schedule=parallel", "imitate.parallel_polish_steps=5"])
    double = scaled(cfg, 2).imitate
    assert (double.steps_per_point, double.parallel_polish_steps) == (30, 10)
    tenth = scaled(cfg, 0.1).imitate  # 15 → 2 steps per point: the polish must stay below
    assert tenth.steps_per_point == 2 and tenth.parallel_polish_steps < 2
