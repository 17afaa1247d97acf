"""Autograd wrapper of the fused imitation loss, and its public function.

The forward pass computes the loss *and* the gradients (see ``fused.py``), so that no tensor of
the prediction's size is kept for backward. Backward is one kernel launch: it multiplies the
stored gradients by grad_output (and, for float16, by the loss scale the forward left out) in
float32 and rounds them to their dtype - in place for dx and d_residual, a no-op on the device when
the factor is 1 - and hands them over, so it can run once per forward: ``retain_graph=True``
followed by a second backward raises RuntimeError.
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from .availability import require_triton
from .layout import (
    KERNEL_DTYPES,
    ImitationProblem,
    as_weight_matrix,
    cast_to_compute_dtype,
    check_arguments,
)


class ImitationMSEFunction(torch.autograd.Function):
    """Loss from the fused forward; gradients precomputed there, scaled and rounded in backward."""

    @staticmethod
    def forward(ctx, x, target, weight, bias, residual, mask, reduction, problem, needs):
        from .fused import fused_forward  # imports triton

        loss, grads = fused_forward(problem, x, target, weight, bias, residual, reduction, mask,
                                    needs)
        # Kept as an attribute, not save_for_backward: backward drops the reference before
        # returning the tensors, so AccumulateGrad can adopt them instead of copying.
        ctx.grads = grads
        return loss

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):
        grads = ctx.grads
        if grads is None:
            raise RuntimeError(
                "imitation_mse computes its gradients in the forward pass and hands them over "
                "in the first backward; a second backward through the same graph "
                "(retain_graph=True) is not supported - run the forward again"
            )
        ctx.grads = None
        dx, dw, db, dr = grads.finish(grad_output)  # one kernel launch for all of them
        return dx, None, dw, db, dr, None, None, None, None


def imitation_mse(
    x: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    residual: torch.Tensor | None = None,
    reduction: str = "mean",
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Fused imitation loss: squared error of ``x @ weight.T + bias + residual`` to ``target``.

    Same semantics as :func:`imitation_mse_reference` (see there for shapes; masks have x's
    shape without the feature dim, e.g. ``(B, H, W)`` for ``(B, C, H, W)`` maps, and an
    all-False mask gives loss 0 with zero gradients). Runs the Triton kernels: on CUDA, or on CPU
    under ``TRITON_INTERPRET=1`` (slow; for tests).

    Differentiable with respect to x, weight, bias and residual; target gets no gradient.
    x may be float32, bfloat16 or float16. Dtypes follow the reference's rule: x's dtype is the
    compute dtype, weight, bias and residual are cast to it when they differ (a differentiable
    cast: each gradient comes back in its tensor's own dtype), target may have any floating dtype.
    y and y - target are formed in float32 registers, sums are accumulated in float32 and the loss
    is a float32 scalar. For 4-D inputs dx is returned in channels-last memory format.

    Note: ``torch.autocast`` is not applied (by either backend): inside an autocast region the
    result is the same as outside it. A second backward through the same graph
    (``retain_graph=True``) raises RuntimeError.
    """
    weight = as_weight_matrix(weight)
    problem: ImitationProblem = check_arguments(x, target, weight, bias, residual, reduction, mask)
    if x.dtype not in KERNEL_DTYPES:
        raise ValueError(f"imitation_mse supports float32, bfloat16 and float16 x, got {x.dtype}")
    require_triton(x.device)
    weight, bias, residual = cast_to_compute_dtype(x, weight, bias, residual)
    target = target.detach()

    grad_on = torch.is_grad_enabled()
    needs = tuple(
        bool(grad_on and t is not None and t.requires_grad) for t in (x, weight, bias, residual)
    )
    if not any(needs):  # inference / evaluation: loss only, no gradient writes at all
        from .fused import fused_forward

        return fused_forward(problem, x, target, weight, bias, residual, reduction, mask, needs)[0]
    return ImitationMSEFunction.apply(
        x, target, weight, bias, residual, mask, reduction, problem, needs
    )
