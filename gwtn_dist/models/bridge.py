"""Mergeable linear pairs between thin blocks, for when thin and wide boundary widths differ.

At imitation point k the thin output h (B, c, H, W) is lifted by P_k (c → C, the wide width) for
the comparison with the wide output, and mapped back by Q_k (C → c) before it enters the next thin
block. Both are plain linear maps (1×1 convs without bias), so after imitation the product
M_k = Q_k P_k (c × c) can be folded into the layers that consume h: the first 1×1 conv and the
projection shortcut of the next block, or the classifier (average pooling is linear). The merged
thin net then has exactly its original shape and computes the same function.

A BERT twin with a wider hidden size (``widen.boundary_mult`` > 1) gets lifts only: P_k maps a
thin layer output (B, T, D) to the wide width D' for the comparison, and nothing is inserted
into the thin net's forward path (Q_k is P_k's left inverse, so Q_k P_k = I and the merge is
exact and empty). A pair with a trained back map could not be folded there: every layer's
consumer of h is ``LayerNorm(h + attention(h))``, and an identity residual followed by a
LayerNorm does not absorb a c × c matrix. (The same holds for a ResNet block with an identity
shortcut, which is why ResNet pairs only sit in front of projection shortcuts or the head.)
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import nn


class PointWidths(Protocol):
    """What pairs need from the thin net's family (``models.family.Family`` has it)."""

    lift_only: bool  # pairs are lifts P only (no trained back map Q)

    def boundary_width(self, model: nn.Module, point: str) -> int: ...

    def merge_pairs(self, thin: nn.Module, bridges: Bridges, skip: list[str]) -> None: ...


class LinearPair(nn.Module):
    """P: c → C (lift, for the comparison) and Q: C → c (back into the thin net).

    Initialised with P's columns orthonormal and Q = Pᵀ, so Q P = I and inserting the pair does
    not change the thin net's function at the start of imitation. With ``back=False`` there is
    no trained Q (``back`` is None): the pair is a lift only and Q P = I stays exact.
    """

    def __init__(self, thin_width: int, wide_width: int, back: bool = True):
        super().__init__()
        if wide_width < thin_width:
            raise ValueError(f"wide width {wide_width} is smaller than thin width {thin_width}")
        # (C, c), orthonormal columns
        basis = torch.linalg.qr(torch.randn(wide_width, thin_width)).Q
        # Row-major copies: QR returns Q column-major, and DeepSpeed broadcasts and flattens
        # parameters through views that need a contiguous last dim.
        self.lift = nn.Parameter(basis.contiguous().clone())  # P: (C, c)
        self.back = nn.Parameter(basis.t().contiguous().clone()) if back else None  # Q: (c, C)

    def lifted(self, h: torch.Tensor) -> torch.Tensor:
        """P h: (B, c, H, W) → (B, C, H, W) for feature maps, (..., c) → (..., C) for tokens."""
        if h.dim() == 4:
            return torch.einsum("oc,bchw->bohw", self.lift, h)
        return h @ self.lift.t()

    def lowered(self, t: torch.Tensor) -> torch.Tensor:
        """A wide output mapped down to the thin width, as the next thin block's input:
        (B, C, H, W) → (B, c, H, W) through Q (trained: Q learns with the blocks it feeds), or
        for a lift only (..., C) → (..., c) through P's pseudo-inverse, held fixed (P learns
        only from its own comparison; Q P h = h for such a pair, so P⁺ t is the thin output h
        whose lift P h is closest to t).

        The parallel imitation schedule feeds each thin segment this from the teacher's output
        at the point below it; in the thin net itself that input is Q P h.
        """
        if self.back is not None:
            return torch.einsum("cC,bChw->bchw", self.back, t.to(self.back.dtype))
        pinv = torch.linalg.pinv(self.lift.detach().float())  # (c, C)
        return t @ pinv.t().to(t.dtype)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """Q P h: (B, c, H, W) → (B, c, H, W)."""
        return torch.einsum("oc,bchw->bohw", self.product(), h)

    def product(self) -> torch.Tensor:
        """M = Q P, (c, c) (the identity for a lift only)."""
        if self.back is None:
            return torch.eye(self.lift.shape[1], device=self.lift.device, dtype=self.lift.dtype)
        return self.back @ self.lift


class Bridges(nn.Module):
    """One LinearPair per imitation point, keyed by point name (dots replaced for ModuleDict).

    The thin net's family decides the pairs' kind and the widths at each point: ResNet points
    get full pairs (P and Q); BERT points get lifts only (see the module's docstring).
    """

    def __init__(self, thin: nn.Module, wide: nn.Module, points: list[str],
                 family: PointWidths):
        super().__init__()
        self.family = family  # a plain attribute: not a module, not in the state dict
        self.points = list(points)
        self.lift_only = family.lift_only
        self.pairs = nn.ModuleDict()
        for point in points:
            c = family.boundary_width(thin, point)
            big = family.boundary_width(wide, point)
            self.pairs[_key(point)] = LinearPair(c, big, back=not self.lift_only)

    def pair(self, point: str) -> LinearPair:
        return self.pairs[_key(point)]


def _key(point: str) -> str:
    return point.replace(".", "_")


@torch.no_grad()
def merge_bridges(thin: nn.Module, bridges: Bridges, skip: list[str] = ()) -> nn.Module:
    """Fold every pair's M = Q P into the layers that consume the point's output (in place;
    the thin net's family knows which: for a ResNet the next block's first 1×1 conv and
    projection shortcut, or the classifier after the last block).

    Points in ``skip`` are left out (the last one, when its head was already set from the wide
    net through P). Lifts only (BERT) have nothing to merge.
    """
    if bridges.lift_only:
        return thin
    bridges.family.merge_pairs(thin, bridges, list(skip))
    return thin
