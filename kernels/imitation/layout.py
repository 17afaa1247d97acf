"""Argument checks and row views shared by the reference and the fused imitation loss.

Every supported input is seen as a matrix of *rows* (one per token or pixel) by *features*:

* ``(N, D)``          -> N rows;
* ``(B, T, D)``       -> B*T rows (e.g. padded token sequences);
* ``(B, C, H, W)``    -> B*H*W rows of C features (conv feature maps, in channels-first or
  channels-last memory format; the feature dim is the channel dim 1).

The *lead shape* is the shape without the feature dim: ``(N,)``, ``(B, T)`` or ``(B, H, W)``.
Masks have exactly the lead shape. Kernels address such tensors through a 3-D
``(outer, inner, feature)`` view, where ``row = outer_index * inner + inner_index``; that view
exists without a copy for every 2-D/3-D tensor and for 4-D tensors whose H and W dims can be
merged (true for contiguous and channels-last tensors), so strided inputs are read in place.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

REDUCTIONS = ("mean", "sum")
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@dataclass(frozen=True)
class ImitationProblem:
    """Sizes of one imitation-loss call, derived from (and checked against) its arguments."""

    x_shape: tuple[int, ...]
    lead_shape: tuple[int, ...]  # x.shape without the feature dim; also the mask shape
    rows: int  # M = prod(lead_shape)
    d_in: int
    d_out: int

    @property
    def channels_first(self) -> bool:
        return len(self.x_shape) == 4

    @property
    def inner(self) -> int:
        """Size of the inner row dim of the (outer, inner, feature) view."""
        if len(self.x_shape) == 2:
            return self.rows
        return math.prod(self.lead_shape[1:])

    @property
    def y_shape(self) -> tuple[int, ...]:
        """Shape of the prediction y (and of target / residual)."""
        if self.channels_first:
            b, _, h, w = self.x_shape
            return (b, self.d_out, h, w)
        return (*self.x_shape[:-1], self.d_out)


def as_weight_matrix(weight: torch.Tensor | None) -> torch.Tensor | None:
    """Accept a 1x1-conv weight ``(C_out, C_in, 1, 1)`` as the matrix ``(C_out, C_in)`` (a view)."""
    if weight is not None and weight.dim() == 4 and tuple(weight.shape[2:]) == (1, 1):
        return weight.flatten(1)
    return weight


def check_arguments(
    x: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    residual: torch.Tensor | None,
    reduction: str,
    mask: torch.Tensor | None,
) -> ImitationProblem:
    """Validate shapes, dtypes and devices; raise ``ValueError`` with the reason if invalid."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if x.dim() not in (2, 3, 4):
        raise ValueError(
            f"x must be (N, D), (B, T, D) or (B, C, H, W), got shape {tuple(x.shape)}"
        )
    tensors = {"x": x, "target": target, "weight": weight, "bias": bias, "residual": residual}
    for name, t in tensors.items():
        if t is not None and not t.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor, got {t.dtype}")
        if t is not None and t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}")

    feature_dim = 1 if x.dim() == 4 else x.dim() - 1
    d_in = x.shape[feature_dim]
    lead_shape = tuple(s for i, s in enumerate(x.shape) if i != feature_dim)

    if weight is None:
        if bias is not None:
            raise ValueError("bias was given without weight; with no weight, y = x [+ residual]")
        d_out = d_in
    else:
        if weight.dim() != 2 or weight.shape[1] != d_in:
            raise ValueError(
                f"weight must be (D_out, {d_in}) (or a 1x1 conv weight), got {tuple(weight.shape)}"
            )
        d_out = weight.shape[0]
        if bias is not None and tuple(bias.shape) != (d_out,):
            raise ValueError(f"bias must have shape ({d_out},), got {tuple(bias.shape)}")

    problem = ImitationProblem(
        x_shape=tuple(x.shape),
        lead_shape=lead_shape,
        rows=math.prod(lead_shape),
        d_in=d_in,
        d_out=d_out,
    )
    if tuple(target.shape) != problem.y_shape:
        raise ValueError(
            f"target must have the prediction's shape {problem.y_shape}, got {tuple(target.shape)}"
        )
    if residual is not None and tuple(residual.shape) != problem.y_shape:
        raise ValueError(
            f"residual must have the prediction's shape {problem.y_shape}, "
            f"got {tuple(residual.shape)}"
        )
    if mask is not None:
        if mask.dtype != torch.bool:
            raise ValueError(f"mask must be a bool tensor, got {mask.dtype}")
        if tuple(mask.shape) != lead_shape:
            raise ValueError(
                f"mask must have x's shape without the feature dim, {lead_shape}, "
                f"got {tuple(mask.shape)}"
            )
        if mask.device != x.device:
            raise ValueError(f"mask is on {mask.device} but x is on {x.device}")
    return problem


def cast_to_compute_dtype(
    x: torch.Tensor, *tensors: torch.Tensor | None
) -> tuple[torch.Tensor | None, ...]:
    """``tensors`` (weight, bias, residual) in x's dtype, the dtype both backends compute in.

    A differentiable cast, so each gradient comes back in its tensor's own dtype (e.g. a float32
    lift on bfloat16 features gets a float32 gradient); a no-op where dtypes already match.
    """
    return tuple(t.to(x.dtype) if t is not None and t.dtype != x.dtype else t for t in tensors)


def feature_last(t: torch.Tensor) -> torch.Tensor:
    """Move the channel dim of a 4-D tensor last (a view); other ranks are already feature-last."""
    return t.movedim(1, -1) if t.dim() == 4 else t


def rows3d(t: torch.Tensor) -> torch.Tensor:
    """The ``(outer, inner, D)`` view of ``t`` used by the kernels; copies only if H, W can't
    merge."""
    if t.dim() == 2:
        return t.unsqueeze(0)  # (1, N, D)
    if t.dim() == 3:
        return t  # (B, T, D)
    f = feature_last(t)  # (B, H, W, C), strided
    b, h, w, c = f.shape
    try:
        return f.view(b, h * w, c)
    except RuntimeError:  # H and W strides do not merge (e.g. a sliced map): copy once
        return f.reshape(b, h * w, c)


def rows2d(t: torch.Tensor) -> torch.Tensor:
    """``t`` as an ``(M, D)`` matrix for cuBLAS: a view where possible, else a contiguous copy."""
    f = feature_last(t)
    d = f.shape[-1]
    m = f.numel() // d if d else 0
    try:
        return f.view(m, d)
    except RuntimeError:  # e.g. channels-first (B, C, H, W): rows are not one stride apart
        return f.reshape(m, d)


def rows2d_to_shape(buf: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """Inverse of :func:`rows2d` for a contiguous ``(M, D)`` buffer, as a view of ``shape``.

    4-D results come back channels-last (``(B, H, W, C)`` storage permuted to ``(B, C, H, W)``).
    """
    if len(shape) == 4:
        b, c, h, w = shape
        return buf.view(b, h, w, c).permute(0, 3, 1, 2)
    return buf.view(shape)


def flat_mask(mask: torch.Tensor) -> torch.Tensor:
    """Row mask ``(M,)`` as uint8 (1 = counted), in the row order of :func:`rows3d`."""
    return mask.reshape(-1).contiguous().view(torch.uint8)


def empty_rows_like(t: torch.Tensor, dtype: torch.dtype | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """An uninitialised tensor shaped like ``t`` (same layout when possible; ``dtype``, default
    t's) and its rows3d view.

    The view is guaranteed to alias the tensor, so kernels can write gradients through it.
    """
    buf = torch.empty_like(t, dtype=dtype, memory_format=torch.preserve_format)
    view = rows3d(buf)
    if view.untyped_storage().data_ptr() != buf.untyped_storage().data_ptr():
        # A dense 4-D layout whose H, W do not merge: channels-last always merges.
        buf = torch.empty_like(t, dtype=dtype, memory_format=torch.channels_last)
        view = rows3d(buf)
    return buf, view
