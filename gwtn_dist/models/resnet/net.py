"""Bottleneck ResNets built as a thin net and its widened twin.

Both nets of a pair have the same depth and the same module names (``stem``, ``layer1.0`` …,
``fc``), so an imitation point such as ``layer2`` names the same place in each. Widening follows
the paper's ResNet reading: the inner 3×3 width of every bottleneck is multiplied by
``inner_mult`` (default ×4); optionally the block-boundary width is multiplied by
``boundary_mult``, in which case the thin net needs linear pairs at the imitation points
(``models/bridge.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn


@dataclass(frozen=True)
class ResNetShape:
    """Everything that fixes a ResNet's tensor shapes.

    ``inner_widths[i]`` is the 3×3 width of stage ``i``; its output (boundary) width is
    ``boundary_widths[i]``. ``geometry`` is ``"small"`` (3×3 stem, for 28×28/32×32 inputs) or
    ``"imagenet"`` (7×7 stride-2 stem + max-pool, for 224×224).
    """

    geometry: str
    in_channels: int
    num_classes: int
    stem_width: int
    blocks: tuple[int, ...]
    inner_widths: tuple[int, ...]
    boundary_widths: tuple[int, ...]
    family: ClassVar[str] = "resnet"  # finds the family of a shape (models.family.family_for)


class Bottleneck(nn.Module):
    """1×1 reduce → 3×3 → 1×1 expand, with a projection shortcut where shapes change.

    ``projection`` forces a 1×1 conv shortcut even when shapes match; the first block of every
    stage has one, which is what lets a linear pair in front of it be merged exactly.
    """

    def __init__(self, in_ch: int, inner: int, out_ch: int, stride: int, projection: bool):
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, inner, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(inner)
        self.conv2 = nn.Conv2d(inner, inner, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(inner)
        self.conv3 = nn.Conv2d(inner, out_ch, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_ch)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut: nn.Module = nn.Identity()
        if projection or stride != 1 or in_ch != out_ch:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False), nn.BatchNorm2d(out_ch)
            )

    @property
    def has_projection(self) -> bool:
        return not isinstance(self.shortcut, nn.Identity)

    def forward(self, x: torch.Tensor, preact: bool = False) -> torch.Tensor:
        """(B, in_ch, H, W) → (B, out_ch, H/s, W/s); with ``preact`` the sum of the residual
        branch and the shortcut before the final ReLU (the block's output is its ReLU)."""
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out)) + self.shortcut(x)
        return out if preact else self.relu(out)


class ResNet(nn.Module):
    """A bottleneck ResNet whose blocks can be run one at a time.

    ``blocks()`` lists ``(name, module)`` in forward order (the stem first); the imitation code
    runs a prefix of that list and reads the output at an imitation point. ``forward`` is the
    ordinary classifier: (B, C_in, H, W) → logits (B, num_classes).
    """

    family = "resnet"  # finds the family of a net (models.family.family_for)

    def __init__(self, shape: ResNetShape):
        super().__init__()
        self.shape = shape
        if shape.geometry == "small":
            self.stem = nn.Sequential(
                nn.Conv2d(shape.in_channels, shape.stem_width, 3, padding=1, bias=False),
                nn.BatchNorm2d(shape.stem_width),
                nn.ReLU(inplace=True),
            )
        elif shape.geometry == "imagenet":
            self.stem = nn.Sequential(
                nn.Conv2d(shape.in_channels, shape.stem_width, 7, stride=2, padding=3, bias=False),
                nn.BatchNorm2d(shape.stem_width),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(3, stride=2, padding=1),
            )
        else:
            raise ValueError(f"unknown ResNet geometry {shape.geometry!r}")
        in_ch = shape.stem_width
        self.stage_names: list[str] = []
        for i, (n, inner, out_ch) in enumerate(
            zip(shape.blocks, shape.inner_widths, shape.boundary_widths, strict=True)
        ):
            stride = 1 if i == 0 else 2
            layer = nn.Sequential(
                *[
                    Bottleneck(in_ch if j == 0 else out_ch, inner, out_ch,
                               stride if j == 0 else 1, projection=j == 0)
                    for j in range(n)
                ]
            )
            name = f"layer{i + 1}"
            self.add_module(name, layer)
            self.stage_names.append(name)
            in_ch = out_ch
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_ch, shape.num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def blocks(self) -> list[tuple[str, nn.Module]]:
        """The blocks in forward order: ``stem``, then ``layerI.J`` for every bottleneck."""
        out: list[tuple[str, nn.Module]] = [("stem", self.stem)]
        for stage in self.stage_names:
            for j, block in enumerate(getattr(self, stage)):
                out.append((f"{stage}.{j}", block))
        return out

    def head(self, features: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) output of the last block → logits (B, num_classes)."""
        return self.fc(torch.flatten(self.pool(features), 1))

    def forward(self, x: torch.Tensor, upto: int | None = None,
                points: list[int] | None = None, preact: bool = False):
        """Logits (B, classes) of x (B, C_in, H, W); with ``upto``, the output of block ``upto``
        of ``blocks()`` instead (blocks after it are not run); with ``points`` (block indices,
        ascending), the tuple of those blocks' outputs from one pass (blocks after the last
        are not run). ``preact``: a returned block output is taken before the block's final
        ReLU (``imitate.point_site: preact``; a bottleneck's, not the stem's)."""
        if points is not None:
            outs = []
            for i, (_, block) in enumerate(self.blocks()[: points[-1] + 1]):
                x = run_block(block, x, preact and i in points)
                if i in points:
                    outs.append(x)
                    x = torch.relu(x) if preact else x
            return tuple(outs)
        for i, (_, block) in enumerate(self.blocks()):
            x = run_block(block, x, preact and i == upto)
            if i == upto:
                return x
        return self.head(x)

    def run_blocks(self, h: torch.Tensor, start: int, end: int,
                   preact: bool = False) -> torch.Tensor:
        """Blocks ``start``..``end`` (inclusive) of ``blocks()`` on h, block ``start``'s input
        (B, c, H, W); returns block ``end``'s output (before its final ReLU with ``preact``)."""
        for i, (_, block) in enumerate(self.blocks()[start : end + 1], start):
            h = run_block(block, h, preact and i == end)
        return h


def run_block(block: nn.Module, x: torch.Tensor, preact: bool) -> torch.Tensor:
    """One block of ``ResNet.blocks()`` on x; ``preact`` asks a bottleneck for its output before
    the final ReLU (the stem has no residual sum: it always gives its ordinary output)."""
    if preact and isinstance(block, Bottleneck):
        return block(x, preact=True)
    return block(x)


def imitation_points(model: ResNet, where: str) -> list[str]:
    """Names of the blocks whose outputs are imitated: the last block of each stage, or every block.

    A point is named by its stage (``layer2``) when ``where == "stages"`` and by its block
    (``layer2.1``) when ``where == "blocks"``; ``point_block_index`` maps either to a position
    in ``model.blocks()``.
    """
    if where == "stages":
        return list(model.stage_names)
    if where == "blocks":
        return [name for name, _ in model.blocks()[1:]]
    raise ValueError(f"imitation points must be 'stages' or 'blocks', got {where!r}")


def point_block_index(model: ResNet, point: str) -> int:
    """Index into ``model.blocks()`` of the block whose output is the point ``point``."""
    names = [name for name, _ in model.blocks()]
    if point in names:
        return names.index(point)
    # A stage name stands for its last block.
    last = [i for i, name in enumerate(names) if name.split(".")[0] == point]
    if not last:
        raise KeyError(f"no block or stage named {point!r}; blocks are {names}")
    return last[-1]
