"""Build the thin net and its wide twin from one ModelConfig."""

from __future__ import annotations

from ..config import ModelConfig
from .resnet import ResNet, ResNetShape


def resnet_shape(cfg: ModelConfig, wide: bool, blocks: list[int] | None = None) -> ResNetShape:
    """The shape of the thin net (``wide=False``) or of its twin; ``blocks`` overrides the depth."""
    inner_mult = cfg.widen.inner_mult if wide else 1
    boundary_mult = cfg.widen.boundary_mult if wide else 1
    return ResNetShape(
        geometry=cfg.geometry,
        in_channels=cfg.in_channels,
        num_classes=cfg.num_classes,
        stem_width=cfg.stem_width * boundary_mult,
        blocks=tuple(blocks or cfg.blocks),
        inner_widths=tuple(w * inner_mult for w in cfg.inner_widths),
        boundary_widths=tuple(w * cfg.expansion * boundary_mult for w in cfg.inner_widths),
    )


def build_thin(cfg: ModelConfig, blocks: list[int] | None = None) -> ResNet:
    """The thin (student) net; ``blocks`` gives a deeper variant for the baseline."""
    return ResNet(resnet_shape(cfg, wide=False, blocks=blocks))


def build_wide(cfg: ModelConfig) -> ResNet:
    """The widened twin: same depth and block names, wider inside (and optionally at boundaries)."""
    return ResNet(resnet_shape(cfg, wide=True))


def needs_bridges(cfg: ModelConfig) -> bool:
    """Linear pairs are needed only where thin and wide boundary widths differ."""
    return cfg.widen.boundary_mult != 1
