"""Stage 2's recipe knobs and its health check: where a ResNet point is read (after or before
the block's final ReLU), how the MSE reduces over channels, and the warning a user gets when
the warm start did not reach the teacher."""

from __future__ import annotations

import json
import logging
import shutil

import pytest
import torch

from gwtn_dist.cli import main
from gwtn_dist.config import ConfigError, load_config
from gwtn_dist.models.family import build_wide
from gwtn_dist.models.resnet.config import ResNetModelConfig
from gwtn_dist.models.resnet.task import run_prefix
from tests.test_pipeline import fast_args


def test_a_preact_point_is_the_residual_sum_before_the_final_relu():
    net = build_wide(ResNetModelConfig(blocks=[2, 1, 1], inner_widths=[4, 4, 8],
                                       stem_width=8)).eval()
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        for end in (1, 2, 4):  # layer1.0, layer1.1 (identity shortcut), layer3.0
            pre, post = net(x, upto=end, preact=True), net(x, upto=end)
            block = net.blocks()[end][1]
            h = run_prefix(net, x, end - 1)
            by_hand = block.bn3(block.conv3(block.relu(block.bn2(block.conv2(
                block.relu(block.bn1(block.conv1(h)))))))) + block.shortcut(h)
            torch.testing.assert_close(pre, by_hand)
            torch.testing.assert_close(torch.relu(pre), post)
            assert (pre < 0).any()  # the ReLU's input: the part a post-ReLU match cannot see
            torch.testing.assert_close(run_prefix(net, x, end, preact=True), pre)
        # Several points from one pass: each before its ReLU, the pass itself unchanged.
        outs = net(x, points=[1, 4], preact=True)
        torch.testing.assert_close(outs[0], net(x, upto=1, preact=True))
        torch.testing.assert_close(outs[1], net(x, upto=4, preact=True))
        torch.testing.assert_close(net.run_blocks(run_prefix(net, x, 1), 2, 4, preact=True),
                                   outs[1])


@pytest.mark.parametrize("overrides, message", [
    (["imitate.point_site=preact", "imitate.schedule=parallel"], "schedule=sequential"),
    (["imitate.point_site=preact", "model.widen.boundary_mult=2"], "boundary_mult 1"),
    (["imitate.point_site=preact", "model.family=bert", "data.dataset=text"], "ResNet blocks"),
    (["imitate.health_max_error=0"], "imitate.health_max_error"),
])
def test_recipe_knobs_that_cannot_work_together_are_refused(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


@pytest.fixture(scope="module")
def teacher(tmp_path_factory, shard_dir):
    """A finished wide stage of the fast fixture run, copied into each imitation run."""
    run_dir = tmp_path_factory.mktemp("teacher")
    assert main(["-q", "wide", *fast_args(run_dir, shard_dir)]) == 0
    return run_dir / "wide"


@pytest.fixture(scope="module")
def twin_teacher(tmp_path_factory, shard_dir):
    """A teacher as wide as the thin net (inner ×1), trained long enough that its batch-norm
    running statistics match its final weights."""
    run_dir = tmp_path_factory.mktemp("twin")
    assert main(["-q", "wide", *fast_args(run_dir, shard_dir, *TWIN)]) == 0
    return run_dir / "wide"


TWIN = ["model.widen.inner_mult=1", "wide.steps=120"]


def imitate(tmp_path, teacher, shard_dir, name, *extra):
    run_dir = tmp_path / name
    shutil.copytree(teacher, run_dir / "wide")
    assert main(["-q", "imitate", *fast_args(run_dir, shard_dir, *extra)]) == 0
    stage = json.loads((run_dir / "imitate" / "stage.json").read_text())
    records = [json.loads(line) for line in (run_dir / "imitate" / "metrics.jsonl").open()]
    return stage, records


def test_a_channel_sum_scales_each_points_loss_by_its_width(tmp_path, teacher, shard_dir):
    # The first step of each phase sees the same weights and batch in both runs (phase k
    # starts from phase k−1's end, which differs, so compare phase 0 exactly and the rest by
    # their relative errors' definition): the loss is C × the mean's, C the point's width.
    one = ["imitate.steps_per_point=1"]
    mean, rec_mean = imitate(tmp_path, teacher, shard_dir, "mean", *one)
    total, rec_sum = imitate(tmp_path, teacher, shard_dir, "sum", *one,
                             "imitate.channel_reduction=sum")
    widths = {"layer1": 16, "layer2": 16, "layer3": 32}  # inner [4,4,8] × expansion 4
    assert rec_sum[0]["loss"] == pytest.approx(widths["layer1"] * rec_mean[0]["loss"], rel=1e-5)
    assert rec_sum[0]["rel_error"] == pytest.approx(rec_mean[0]["rel_error"], rel=1e-5)
    for rec in rec_sum:  # every phase: loss = C × (relative error × the target's variance)
        assert rec["loss"] > rec["rel_error"]
    assert total["settings"]["channel_reduction"] == "sum"
    assert mean["settings"]["channel_reduction"] == "mean"


def test_preact_points_train_and_lower_their_own_error(tmp_path, teacher, shard_dir):
    stage, records = imitate(tmp_path, teacher, shard_dir, "preact", "imitate.point_site=preact",
                             "model.imitation_points=blocks", "imitate.steps_per_point=10")
    assert stage["settings"]["point_site"] == "preact"
    assert stage["points"] == ["layer1.0", "layer2.0", "layer3.0"]
    first = records[0]["rel_error"]
    assert records[9]["rel_error"] < first  # layer1.0's phase lowers its error


def test_a_warm_start_cut_short_is_flagged_and_a_converged_one_is_not(
        tmp_path, teacher, twin_teacher, shard_dir, caplog):
    with caplog.at_level(logging.WARNING, logger="gwtn"):
        short, _ = imitate(tmp_path, teacher, shard_dir, "short", "imitate.steps_per_point=2")
    assert short["health"]["reached"] is False
    assert short["health"]["max_relative_error"] > 0.3
    assert short["health"]["teacher"] == json.loads((teacher / "stage.json").read_text())[
        "val_accuracy"]
    assert "the warm start did not reach the teacher" in caplog.text
    caplog.clear()
    # Converged: a thin net as wide as its teacher, started from the teacher's own weights at
    # a tiny lr, reproduces the teacher's outputs up to batch-norm's batch statistics.
    with caplog.at_level(logging.WARNING, logger="gwtn"):
        ok, _ = imitate(tmp_path, twin_teacher, shard_dir, "converged", *TWIN,
                        f"imitate.init={twin_teacher / 'model.pt'}", "imitate.optim.lr=1e-5",
                        "imitate.steps_per_point=3")
    assert ok["health"]["reached"] is True, ok["relative_error"]
    assert "did not reach" not in caplog.text
