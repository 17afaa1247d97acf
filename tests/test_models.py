"""The ResNet family: thin/wide twins, imitation points, ImageNet geometries, merged bridges."""

from __future__ import annotations

import pytest
import torch

from gwtn_dist.config import load_config
from gwtn_dist.models.bridge import Bridges, merge_bridges
from gwtn_dist.models.family import build_thin, build_wide, family_for
from gwtn_dist.models.resnet.config import ResNetModelConfig, ResNetWidening
from gwtn_dist.models.resnet.net import imitation_points, point_block_index
from tests.conftest import REPO


def small_cfg(**kw) -> ResNetModelConfig:
    base = {"blocks": [2, 1, 2], "inner_widths": [4, 8, 8], "stem_width": 8}
    base.update(kw)
    return ResNetModelConfig(**base)


def test_twins_share_names_and_widen_the_inner_width():
    cfg = small_cfg()
    thin, wide = build_thin(cfg), build_wide(cfg)
    assert [n for n, _ in thin.blocks()] == [n for n, _ in wide.blocks()]
    for (_, tb), (_, wb) in zip(thin.blocks()[1:], wide.blocks()[1:], strict=True):
        assert wb.conv2.in_channels == 4 * tb.conv2.in_channels  # inner 3×3 width ×4
        assert wb.conv3.out_channels == tb.conv3.out_channels  # boundary width unchanged
    x = torch.randn(3, 1, 28, 28)
    assert thin(x).shape == wide(x).shape == (3, 10)


def test_boundary_widening_multiplies_block_outputs():
    cfg = small_cfg(widen=ResNetWidening(inner_mult=2, boundary_mult=3))
    thin, wide = build_thin(cfg), build_wide(cfg)
    for (_, tb), (_, wb) in zip(thin.blocks()[1:], wide.blocks()[1:], strict=True):
        assert wb.conv3.out_channels == 3 * tb.conv3.out_channels
        assert wb.conv2.in_channels == 2 * tb.conv2.in_channels


def test_imitation_points_are_stage_outputs_or_every_block():
    thin = build_thin(small_cfg())
    assert imitation_points(thin, "stages") == ["layer1", "layer2", "layer3"]
    assert imitation_points(thin, "blocks") == ["layer1.0", "layer1.1", "layer2.0",
                                                "layer3.0", "layer3.1"]
    names = [n for n, _ in thin.blocks()]
    assert names[point_block_index(thin, "layer1")] == "layer1.1"
    assert names[point_block_index(thin, "layer3")] == "layer3.1"
    with pytest.raises(KeyError):
        point_block_index(thin, "layer9")


@pytest.mark.parametrize("name, params", [("imagenet_resnet50.yaml", 25_557_032),
                                          ("imagenet_resnet101.yaml", 44_549_160)])
def test_imagenet_geometries_match_the_standard_resnets(name, params):
    # The published parameter counts of ResNet50/101 (He et al.; torchvision's counts).
    cfg = load_config(REPO / "configs" / name)
    thin = build_thin(cfg.model)
    assert sum(p.numel() for p in thin.parameters()) == params
    thin.eval()
    with torch.no_grad():
        assert thin(torch.randn(1, 3, 224, 224)).shape == (1, 1000)


def test_merged_bridges_compute_the_same_function():
    torch.manual_seed(0)
    cfg = small_cfg(widen=ResNetWidening(inner_mult=2, boundary_mult=2))
    thin, wide = build_thin(cfg), build_wide(cfg)
    points = imitation_points(thin, "stages")
    bridges = Bridges(thin, wide, points, family_for(thin))
    with torch.no_grad():  # make Q P far from the identity so the merge has work to do
        for pair in bridges.pairs.values():
            pair.lift.add_(0.3 * torch.randn_like(pair.lift))
            pair.back.add_(0.3 * torch.randn_like(pair.back))
    thin.eval()
    x = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        h = x
        for i, (_, block) in enumerate(thin.blocks()):
            h = block(h)
            for p in points:
                if point_block_index(thin, p) == i:
                    h = bridges.pair(p)(h)
        expected = thin.head(h)
        shapes = {k: v.shape for k, v in thin.state_dict().items()}
        merge_bridges(thin, bridges)
        got = thin(x)
    assert {k: v.shape for k, v in thin.state_dict().items()} == shapes
    assert torch.allclose(got, expected, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(got, build_thin(cfg).eval()(x), atol=1e-2)


def test_fresh_pair_is_the_identity():
    widen = ResNetWidening(inner_mult=1, boundary_mult=4)
    thin, wide = build_thin(small_cfg()), build_wide(small_cfg(widen=widen))
    pair = Bridges(thin, wide, ["layer1"], family_for(thin)).pair("layer1")
    assert torch.allclose(pair.product(), torch.eye(pair.product().shape[0]), atol=1e-5)
    # Row-major: DeepSpeed broadcasts each parameter as a byte view, which needs stride 1 last.
    assert pair.lift.is_contiguous() and pair.back.is_contiguous()


def test_merge_refuses_identity_shortcuts():
    cfg = small_cfg(widen=ResNetWidening(inner_mult=1, boundary_mult=2))
    thin, wide = build_thin(cfg), build_wide(cfg)
    # layer1.0 is followed by layer1.1: an identity shortcut
    bridges = Bridges(thin, wide, ["layer1.0"], family_for(thin))
    with pytest.raises(ValueError, match="identity shortcut"):
        merge_bridges(thin, bridges)
