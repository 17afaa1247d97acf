"""A third model family written the way a user would add one, without an edit outside it: an
MLP on Fashion-MNIST images with two imitation points (the outputs of its two hidden blocks).
Importing this module registers it as ``model.family: mlp`` (its one registration line)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Literal

import torch
from torch import nn

from gwtn_dist.config import Config, ConfigError, ModelConfig, WideningConfig
from gwtn_dist.models.family import register_family
from gwtn_dist.models.resnet.task import ImageTask


@dataclass
class MlpWidening(WideningConfig):
    """The twin: every hidden block's inner width × ``inner_mult`` (boundaries unchanged)."""

    inner_mult: int = 4


@dataclass
class MlpModelConfig(ModelConfig):
    """``model:`` of an MLP: ``hidden`` units at the block boundaries, ``inner`` inside."""

    family: Literal["mlp"] = "mlp"
    DATASETS: ClassVar[tuple[str, ...]] = ("fashion-mnist",)
    hidden: int = 16
    inner: int = 16
    num_classes: int = 10
    widen: MlpWidening = field(default_factory=MlpWidening)

    def check(self, cfg: Config) -> None:
        if min(self.hidden, self.inner) < 1:
            raise ConfigError("model.hidden, model.inner: must be positive")


@dataclass(frozen=True)
class MlpShape:
    family: ClassVar[str] = "mlp"
    hidden: int
    inner: int
    depth: int  # hidden blocks
    num_classes: int


class Mlp(nn.Module):
    """(B, 1, 28, 28) → logits; ``blocks()``: ``embed``, then ``block1``…``blockN``."""

    family = "mlp"

    def __init__(self, shape: MlpShape):
        super().__init__()
        self.shape = shape
        self.embed = nn.Sequential(nn.Flatten(), nn.Linear(28 * 28, shape.hidden), nn.ReLU())
        self.hidden = nn.ModuleList(
            nn.Sequential(nn.Linear(shape.hidden, shape.inner), nn.ReLU(),
                          nn.Linear(shape.inner, shape.hidden), nn.ReLU())
            for _ in range(shape.depth))
        self.fc = nn.Linear(shape.hidden, shape.num_classes)

    def blocks(self) -> list[tuple[str, nn.Module]]:
        return [("embed", self.embed)] + [(f"block{i + 1}", b) for i, b in enumerate(self.hidden)]

    def forward(self, x: torch.Tensor, upto: int | None = None,
                points: list[int] | None = None) -> torch.Tensor:
        outs = []
        for i, (_, block) in enumerate(self.blocks()):
            x = block(x)
            if points is not None and i in points:
                outs.append(x)
            if i == upto or (points is not None and i == points[-1]):
                return tuple(outs) if points is not None else x
        return self.fc(x)

    def run_blocks(self, h: torch.Tensor, start: int, end: int) -> torch.Tensor:
        for _, block in self.blocks()[start : end + 1]:
            h = block(h)
        return h


class MlpTask(ImageTask):
    """Image classification, as for a ResNet; a point's output is a (B, hidden) vector."""

    def features(self, model, x, end, bridges, bridged):
        return model(x, upto=end)

    def segment(self, model, x, start, end, h, attention=False):
        return model.run_blocks(h, start, end)

    def normalize(self, t: torch.Tensor) -> torch.Tensor:
        return nn.functional.layer_norm(t, t.shape[-1:])


class MlpFamily:
    name = "mlp"
    config_class = MlpModelConfig
    depth_label = "blocks"
    docs = "tests/toy_family.py"
    lift_only = False
    takes_images = True

    def shape(self, m: MlpModelConfig, wide: bool, depth: int | None = None) -> MlpShape:
        return MlpShape(m.hidden, m.inner * (m.widen.inner_mult if wide else 1), depth or 2,
                        m.num_classes)

    def shape_from_meta(self, fields: dict) -> MlpShape:
        return MlpShape(**fields)

    def build(self, shape: MlpShape) -> Mlp:
        return Mlp(shape)

    def thin_depth(self, m: MlpModelConfig) -> int:
        return 2

    def deeper_depth(self, cfg: Config) -> int:
        return 3

    def imitation_points(self, model: Mlp, m: MlpModelConfig) -> list[str]:
        return ["block1", "block2"]

    def point_index(self, model: Mlp, point: str) -> int:
        return [name for name, _ in model.blocks()].index(point)

    def boundary_width(self, model: Mlp, point: str) -> int:
        return model.shape.hidden

    def merge_pairs(self, thin, bridges, skip) -> None:
        raise ValueError("the toy family's twin keeps its boundary widths: nothing to merge")

    def task(self, cfg: Config) -> MlpTask:
        return MlpTask(cfg)

    def init_head(self, cfg, thin, wide, bridges, last_point: str) -> str:
        return "random"

    def load_weights(self, model: Mlp, path: Path) -> None:
        model.load_state_dict(torch.load(path, weights_only=True))

    def export(self, model, out, tokenizer):
        raise ValueError("the toy family exports nothing")

    def synthetic_batch(self, cfg, batch_size, generator):
        return (torch.randn(batch_size, 1, 28, 28, generator=generator),
                torch.randint(0, 10, (batch_size,), generator=generator))


register_family("mlp", MlpFamily())
