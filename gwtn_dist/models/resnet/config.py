"""The ``model`` section of a ResNet run (``model.family: resnet``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from ...config import ModelConfig, WideningConfig


@dataclass
class ResNetWidening(WideningConfig):
    """A ResNet twin: inner_mult multiplies every bottleneck's inner 3×3 width (the paper's
    ResNet reading: 4); ``boundary_mult`` the stage output widths (default 1)."""

    inner_mult: int = 4


@dataclass
class ResNetModelConfig(ModelConfig):
    """The thin ResNet; the wide twin follows from ``widen`` (``inner_mult``, ``boundary_mult``).

    inner_widths are the bottleneck 3×3 widths per stage; a stage outputs inner × expansion
    channels. imitation_points: ``stages`` (the outputs of each stage, the reproduction's
    reading) or ``blocks`` (every bottleneck).
    """

    family: Literal["resnet"] = "resnet"
    geometry: Literal["small", "imagenet"] = "small"
    in_channels: int = 1
    num_classes: int = 10
    stem_width: int = 16
    blocks: list[int] = field(default_factory=lambda: [4, 4, 4])
    inner_widths: list[int] = field(default_factory=lambda: [8, 16, 32])
    expansion: int = 4
    widen: ResNetWidening = field(default_factory=ResNetWidening)
    imitation_points: Literal["stages", "blocks"] = "stages"
