"""The ``model`` section of a ResNet run (``model.family: resnet``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Literal

from ...config import Config, ConfigError, ModelConfig, WideningConfig, _positive


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
    DATASETS: ClassVar[tuple[str, ...]] = ("fashion-mnist", "imagefolder")
    geometry: Literal["small", "imagenet"] = "small"
    in_channels: int = 1
    num_classes: int = 10
    stem_width: int = 16
    blocks: list[int] = field(default_factory=lambda: [4, 4, 4])
    inner_widths: list[int] = field(default_factory=lambda: [8, 16, 32])
    expansion: int = 4
    widen: ResNetWidening = field(default_factory=ResNetWidening)
    imitation_points: Literal["stages", "blocks"] = "stages"

    def check(self, cfg: Config) -> None:
        if not self.blocks or any(b < 1 for b in self.blocks):
            raise ConfigError(
                f"model.blocks: one positive block count per stage, got {self.blocks}")
        if len(self.inner_widths) != len(self.blocks):
            raise ConfigError(
                f"model.inner_widths: needs one width per stage ({len(self.blocks)} stages in "
                f"model.blocks), got {self.inner_widths}"
            )
        for key, value in [
            ("model.inner_widths", min(self.inner_widths)),
            ("model.stem_width", self.stem_width),
            ("model.expansion", self.expansion),
            ("model.in_channels", self.in_channels),
            ("model.widen.inner_mult", self.widen.inner_mult),
        ]:
            _positive(key, value)
        if self.num_classes < 2:
            raise ConfigError(f"model.num_classes: must be at least 2, got {self.num_classes}")
        if self.widen.boundary_mult > 1 and self.imitation_points == "blocks":
            raise ConfigError(
                "model.imitation_points: 'blocks' cannot be used with model.widen.boundary_mult "
                "> 1: a linear pair in front of a block with an identity shortcut cannot be "
                "merged exactly; use 'stages' (pairs sit in front of projection shortcuts or "
                "the head)"
            )
        if cfg.imitate.point_site == "preact" and self.widen.boundary_mult > 1:
            raise ConfigError(
                "imitate.point_site: preact needs model.widen.boundary_mult 1: a linear pair "
                "after a point maps the block's output (after the ReLU), not its sum before it")
        if cfg.data.dataset == "imagefolder" and self.in_channels != 3:
            raise ConfigError(f"model.in_channels: image-folder shards hold RGB images "
                              f"(3 channels), got {self.in_channels}")
        if cfg.imitate.attention_weight:
            raise ConfigError("imitate.attention_weight: attention-map transfer is for BERT only")
        deeper = cfg.compare.deeper_blocks
        if len(deeper) != len(self.blocks) or any(b < 1 for b in deeper):
            raise ConfigError(
                f"compare.deeper_blocks: one positive count per stage ({len(self.blocks)}), "
                f"got {deeper}"
            )


ModelConfig.register("resnet", ResNetModelConfig)
