"""Mergeable linear pairs between thin blocks, for when thin and wide boundary widths differ.

At imitation point k the thin output h (B, c, H, W) is lifted by P_k (c → C, the wide width) for
the comparison with the wide output, and mapped back by Q_k (C → c) before it enters the next thin
block. Both are plain linear maps (1×1 convs without bias), so after imitation the product
M_k = Q_k P_k (c × c) can be folded into the layers that consume h: the first 1×1 conv and the
projection shortcut of the next block, or the classifier (average pooling is linear). The merged
thin net then has exactly its original shape and computes the same function.
"""

from __future__ import annotations

import torch
from torch import nn

from .resnet import Bottleneck, ResNet, point_block_index


class LinearPair(nn.Module):
    """P: c → C (lift, for the comparison) and Q: C → c (back into the thin net).

    Initialised with P's columns orthonormal and Q = Pᵀ, so Q P = I and inserting the pair does
    not change the thin net's function at the start of imitation.
    """

    def __init__(self, thin_width: int, wide_width: int):
        super().__init__()
        if wide_width < thin_width:
            raise ValueError(f"wide width {wide_width} is smaller than thin width {thin_width}")
        basis = torch.linalg.qr(torch.randn(wide_width, thin_width)).Q  # (C, c), orthonormal columns
        self.lift = nn.Parameter(basis.clone())  # P: (C, c)
        self.back = nn.Parameter(basis.t().clone())  # Q: (c, C)

    def lifted(self, h: torch.Tensor) -> torch.Tensor:
        """(B, c, H, W) → (B, C, H, W)."""
        return torch.einsum("oc,bchw->bohw", self.lift, h)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """Q P h: (B, c, H, W) → (B, c, H, W)."""
        return torch.einsum("oc,bchw->bohw", self.back @ self.lift, h)

    def product(self) -> torch.Tensor:
        """M = Q P, (c, c)."""
        return self.back @ self.lift


class Bridges(nn.Module):
    """One LinearPair per imitation point, keyed by point name (dots replaced for ModuleDict)."""

    def __init__(self, thin: ResNet, wide: ResNet, points: list[str]):
        super().__init__()
        self.points = list(points)
        self.pairs = nn.ModuleDict()
        for point in points:
            c = _out_width(thin, point)
            big = _out_width(wide, point)
            self.pairs[_key(point)] = LinearPair(c, big)

    def pair(self, point: str) -> LinearPair:
        return self.pairs[_key(point)]


def _key(point: str) -> str:
    return point.replace(".", "_")


def _out_width(model: ResNet, point: str) -> int:
    block = model.blocks()[point_block_index(model, point)][1]
    if isinstance(block, Bottleneck):
        return block.conv3.out_channels
    raise ValueError(f"imitation point {point!r} is not the output of a bottleneck block")


@torch.no_grad()
def merge_bridges(thin: ResNet, bridges: Bridges, skip: list[str] = ()) -> ResNet:
    """Fold every pair's M = Q P into the layers that consume the point's output (in place).

    The consumer of a point is the next block (whose first 1×1 conv and projection shortcut are
    both linear in the input: W ← W M) or, after the last block, the classifier (W_fc ← W_fc M).
    Points in ``skip`` are left out (the last one, when its head was already set from the wide
    net through P).
    """
    blocks = thin.blocks()
    for point in bridges.points:
        if point in skip:
            continue
        m = bridges.pair(point).product()  # (c, c)
        idx = point_block_index(thin, point)
        if idx + 1 < len(blocks):
            nxt = blocks[idx + 1][1]
            if not isinstance(nxt, Bottleneck) or not nxt.has_projection:
                raise ValueError(
                    f"cannot merge the pair at {point!r}: the next block has an identity shortcut"
                )
            conv1 = nxt.conv1.weight  # (inner, c, 1, 1)
            conv1.copy_(torch.einsum("ic,cd->id", conv1[:, :, 0, 0], m)[:, :, None, None])
            proj = nxt.shortcut[0].weight  # (out, c, 1, 1)
            proj.copy_(torch.einsum("oc,cd->od", proj[:, :, 0, 0], m)[:, :, None, None])
        else:
            thin.fc.weight.copy_(thin.fc.weight @ m)  # (classes, c) @ (c, c)
    return thin
