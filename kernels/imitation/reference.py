"""Plain-PyTorch imitation loss: the ground truth for the fused kernels and the eager baseline."""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from .layout import as_weight_matrix, cast_to_compute_dtype, check_arguments, feature_last


def imitation_mse_reference(
    x: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    residual: torch.Tensor | None = None,
    reduction: str = "mean",
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Squared error between a (lifted) student feature and a frozen teacher feature.

    ``y = x @ weight.T + bias + residual`` (each term optional; with no weight ``y = x
    [+ residual]``), then ``loss = sum over counted elements of (y - target)**2``, divided by the
    number of counted elements for ``reduction="mean"``.

    Args:
        x: student features ``(N, D_in)``, ``(B, T, D_in)`` or ``(B, C_in, H, W)`` (any memory
            format; for 4-D the feature dim is the channel dim and ``weight`` acts as a 1x1 conv).
        target: teacher features, shaped like ``y``; treated as constant (no gradient).
        weight: ``(D_out, D_in)`` (or a ``(C_out, C_in, 1, 1)`` conv weight), optional.
        bias: ``(D_out,)``, only together with ``weight``.
        residual: added to ``y``, shaped like ``y``.
        reduction: ``"mean"`` or ``"sum"``.
        mask: bool, shaped like x without its feature dim (``(N,)``, ``(B, T)`` or ``(B, H, W)``);
            True rows count. The mean divides by ``counted rows * D_out``; when no row counts the
            loss is 0 (not NaN) and every gradient is 0.

    Returns:
        A float32 scalar (float64 for float64 x, for ground-truth runs). As in the fused kernel,
        everything after the matrix product is float32: 16-bit ``y`` (the product's one rounding,
        its sums accumulated in float32 by the GEMM) is widened before the residual and the
        target are added and subtracted, and the squares are summed in float32.

    Dtypes (the same rule for the fused :func:`imitation_mse`): x's dtype is the compute dtype.
    weight, bias and residual are cast to it when they differ (a differentiable cast: their
    gradients come back in their own dtypes); target may have any floating dtype and is not cast.
    ``torch.autocast`` is not applied: inside an autocast region the result is the same as
    outside it.
    """
    weight = as_weight_matrix(weight)
    problem = check_arguments(x, target, weight, bias, residual, reduction, mask)
    weight, bias, residual = cast_to_compute_dtype(x, weight, bias, residual)
    acc_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32

    # autocast would run F.linear in its lower precision: the fused path never does.
    no_autocast = (
        torch.autocast(x.device.type, enabled=False)
        if torch.amp.is_autocast_available(x.device.type) else contextlib.nullcontext()
    )
    with no_autocast:
        # Work feature-last: (..., D). For 4-D inputs these are channels-last views.
        y = feature_last(x)
        if weight is not None:
            y = F.linear(y, weight, bias)  # (..., D_out) in x's dtype
        y = y.to(acc_dtype) if y.dtype.itemsize < 4 else y  # 16-bit: float32 from here on
        if residual is not None:
            y = y + feature_last(residual)
        diff = y - feature_last(target).detach()  # promoted with target's dtype

        if mask is not None:
            # where() (not multiply) so that NaN/inf in ignored rows cannot leak into the loss.
            diff = torch.where(mask.unsqueeze(-1), diff, 0.0)
        total = diff.square().sum(dtype=acc_dtype)
    if reduction == "sum":
        return total
    if mask is None:
        count = problem.rows * problem.d_out
        return total / count if count else total * 0.0
    count = mask.sum() * problem.d_out
    return total / count.clamp_min(1)  # all-False mask: 0 / 1 = 0
