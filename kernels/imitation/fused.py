"""Forward pass of the fused imitation loss: the loss and every requested gradient at once.

Linear case (weight given), rows processed in chunks of ``C`` rows (see :func:`chunk_rows`):

    for each chunk:                                       extra memory
        kernel (a): g_c = dloss/dy for the chunk          g buffer (C, D_out), reused
                    (+ loss / d_bias partials, d_residual written in place)
        dx[c]  = g_c @ W          (cuBLAS, into dx)       dx (M, D_in) is an output anyway
        dW    += g_c.T @ x[c]     (cuBLAS)                (D_out, D_in) float32

so nothing of size M x D_out outlives a chunk, and y is never written at all. Equal-width case
(no weight): kernel (b) reads x, residual, target once and writes dx (and d_residual) once.

Gradients of x and residual come out in their dtype, d_weight and d_bias in float32. For float32
and bfloat16 they are already multiplied by the loss scale (1/count for a mean) and backward only
multiplies them by grad_output; float16 ones are left unscaled (their values 1/count smaller
would underflow, see ``kernel.py``), kept in float32 until backward (at sum-reduction size they
could overflow float16 where the scaled gradient does not), and backward multiplies them by
``scale * grad_output``. Backward (one launch, ``kernel.finish_grads``) applies the factor in
float32: d_weight and d_bias, and float16's dx and d_residual, are rounded to their dtype once,
after it; float32 and bfloat16 dx and d_residual, stored in their dtype, are rounded again only
when the factor is not 1. So a float16 gradient is finite whenever its scaled value fits float16,
and one that does not is inf, which a GradScaler answers by lowering its scale. Left: the chunk
buffer g (float16, ``2 (y - t)``, the GEMMs' operand) overflows only where |y - t| > 32752.

Launches per call: one ``mask.sum()`` for a masked mean (the kernels divide by it on the device),
one zero-fill of the partial sums, per chunk kernel (a) and the two GEMMs, then one sum for the
loss (the partials are already scaled) and one for d_bias.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from . import kernel as K
from .layout import (
    ImitationProblem,
    empty_rows_like,
    flat_mask,
    rows2d,
    rows2d_to_shape,
    rows3d,
)
from .notes import note

# Budget of the transient gradient chunk g, in elements (8M = 16 MiB in bf16). Chunks are never
# smaller than a few thousand rows at real widths, which keeps the cuBLAS calls efficient.
# Tests lower it to exercise the multi-chunk path.
CHUNK_ELEMENTS = 1 << 23
_CHUNK_ALIGN = 128  # rows; chunk starts stay tile-aligned on GPU


@dataclass
class FusedGrads:
    """Gradients of the loss before grad_output; None where not requested.

    ``x`` and ``residual`` have their final dtype (float32 for float16 inputs, see
    ``grad_buffer_dtype``); ``weight`` and ``bias`` are float32; each is rounded to ``dtype`` in
    backward unless already in it. ``pending`` is the part of the loss scale
    not yet applied: 1 when the forward folded it in, else the whole loss scale (float16).
    """

    x: torch.Tensor | None = None
    weight: torch.Tensor | None = None
    bias: torch.Tensor | None = None
    residual: torch.Tensor | None = None
    dtype: torch.dtype = torch.float32  # of every gradient once finished (x's dtype)
    pending: K.LossScale = field(default_factory=lambda: K.LossScale(1.0))

    def finish(self, grad_output: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        """(dx, dW, db, dr): times grad_output and the pending scale, in ``dtype``; one launch."""
        bufs = (self.x, self.weight, self.bias, self.residual)
        return tuple(K.finish_grads(
            [(b, self.dtype) if b is not None else None for b in bufs], grad_output, self.pending
        ))


def folds_scale(dtype: torch.dtype) -> bool:
    """Whether gradients in ``dtype`` can carry the loss scale (1/count) without underflow.

    True for float32 and bfloat16 (float32's exponent range), False for float16.
    """
    return torch.finfo(dtype).tiny <= torch.finfo(torch.float32).tiny


def grad_buffer_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype dx and d_residual are kept in until backward: float32 for float16 inputs
    (unscaled, they may exceed float16's range), else the inputs' dtype."""
    return dtype if folds_scale(dtype) else torch.float32


def chunk_rows(rows: int, d_out: int) -> int:
    """Rows per chunk so that the g buffer (rows x d_out) stays within CHUNK_ELEMENTS."""
    budget = max(CHUNK_ELEMENTS // max(d_out, 1), 1)
    if budget >= rows:
        return max(rows, 1)
    if budget >= _CHUNK_ALIGN:
        budget -= budget % _CHUNK_ALIGN
    return budget


def loss_scale(problem: ImitationProblem, reduction: str, mask: torch.Tensor | None) -> K.LossScale:
    """Factor turning the sum of squares into the loss: 1, 1/count, or 1/D_out / kept rows.

    With a mask the kept rows are counted by one torch reduction and stay on the device: the
    kernels divide by them (no host sync); an all-False mask gives scale 0, hence loss 0 and zero
    gradients.
    """
    if reduction == "sum":
        return K.LossScale(1.0)
    if mask is None:
        count = problem.rows * problem.d_out
        return K.LossScale(1.0 / count if count else 0.0)
    return K.LossScale(1.0 / problem.d_out, mask.sum().reshape(1))  # int64 (1,)


def fused_forward(
    problem: ImitationProblem,
    x: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    residual: torch.Tensor | None,
    reduction: str,
    mask: torch.Tensor | None,
    needs: tuple[bool, bool, bool, bool],
) -> tuple[torch.Tensor, FusedGrads]:
    """Loss (float32 scalar) and the gradients flagged in ``needs`` = (x, weight, bias, residual).

    Expects checked arguments with weight, bias and residual in x's dtype.
    """
    # The GEMMs below must run in x's dtype: autocast would turn float32 ones into bf16.
    with torch.autocast(x.device.type, enabled=False):
        if problem.rows == 0 or problem.d_out == 0:
            return _empty_problem(x, weight, bias, residual, needs)
        scale = loss_scale(problem, reduction, mask)
        mask_u8 = flat_mask(mask) if mask is not None else None
        if weight is None:
            loss, grads = _eltwise_forward(problem, x, target, residual, mask_u8, scale, needs)
        else:
            loss, grads = _linear_forward(
                problem, x, target, weight, bias, residual, mask_u8, scale, needs
            )
        grads.dtype = x.dtype
        grads.pending = K.LossScale(1.0) if folds_scale(x.dtype) else scale
        return loss, grads


def _empty_problem(x, weight, bias, residual, needs) -> tuple[torch.Tensor, FusedGrads]:
    # No element counts: loss 0 (as for an all-False mask), zero gradients.
    loss = torch.zeros((), dtype=torch.float32, device=x.device)
    inputs = (x, weight, bias, residual)
    grads = [torch.zeros_like(t) if (need and t is not None) else None
             for t, need in zip(inputs, needs, strict=True)]
    return loss, FusedGrads(*grads, dtype=x.dtype)


def _eltwise_forward(problem, x, target, residual, mask_u8, scale, needs):
    need_x, _, _, need_r = needs
    grads = FusedGrads()
    dx3 = dr3 = None
    keep = grad_buffer_dtype(x.dtype)
    if need_x:
        grads.x, dx3 = empty_rows_like(x, keep)
    if need_r and residual is not None:
        grads.residual, dr3 = empty_rows_like(residual, keep)
    partials = K.launch_eltwise_mse(
        rows3d(x),
        rows3d(residual) if residual is not None else None,
        rows3d(target),
        mask_u8,
        scale,
        folds_scale(x.dtype),
        problem.rows,
        problem.inner,
        dx3,
        dr3,
    )
    return partials.sum(), grads  # the partials carry the scale


def _linear_forward(problem, x, target, weight, bias, residual, mask_u8, scale, needs):
    need_x, need_w, need_b, need_r = needs
    need_b = need_b and bias is not None
    need_r = need_r and residual is not None
    rows, d_in, d_out = problem.rows, problem.d_in, problem.d_out
    dev, dtype = x.device, x.dtype

    x2d = rows2d(x)  # (M, D_in): a view, or one copy for channels-first maps
    t3 = rows3d(target)  # (outer, inner, D_out), read in place
    r3 = rows3d(residual) if residual is not None else None

    c = chunk_rows(rows, d_out)
    n_chunks = -(-rows // c)
    need_g = need_x or need_w
    g = torch.empty((c, d_out), dtype=dtype, device=dev) if need_g else None  # (C, D_out)

    grads = FusedGrads()
    keep = grad_buffer_dtype(dtype)
    dx2d = None
    if need_x:
        dx2d = torch.empty((rows, d_in), dtype=keep, device=dev)  # (M, D_in)
        grads.x = rows2d_to_shape(dx2d, problem.x_shape)
    dr3 = None
    if need_r:
        grads.residual, dr3 = empty_rows_like(residual, keep)
    # dW accumulates in float32 over the chunks and is rounded in backward (after the scales).
    dw_acc = None
    fold = folds_scale(dtype)

    loss_shape, db_shape = K.linear_partial_shapes(c, d_out)
    # Partial sums of all chunks, zero-filled by one launch: (n_chunks, *loss_shape) for the
    # loss, then (n_chunks, *db_shape) for d_bias when wanted.
    n_loss = n_chunks * math.prod(loss_shape)
    n_db = n_chunks * math.prod(db_shape) if need_b else 0
    parts = torch.zeros(n_loss + n_db, dtype=torch.float32, device=dev)
    loss_part = parts[:n_loss].view(n_chunks, *loss_shape)
    db_part = parts[n_loss:].view(n_chunks, *db_shape) if need_b else None

    for i in range(n_chunks):
        start = i * c
        n = min(c, rows - start)
        K.launch_linear_mse(
            x2d, weight, bias, r3, t3, mask_u8, scale, fold,
            row_start=start, n_rows=n, inner=problem.inner,
            g=g, dr3=dr3,
            loss_part=loss_part[i],
            db_part=db_part[i] if db_part is not None else None,
            chunk=c,
        )
        if not need_g:
            continue
        g_c = g[:n]  # (n, D_out)
        if need_x and keep == dtype:
            torch.mm(g_c, weight, out=dx2d[start:start + n])  # (n, D_in)
        elif need_x:  # float16: the unscaled product, kept in float32
            dx2d[start:start + n] = _gemm_float32(g_c, weight)
        if need_w:
            x_c = x2d[start:start + n]  # (n, D_in)
            dw_acc = _accumulate_gemm(dw_acc, g_c.t(), x_c)  # (D_out, D_in) float32
    grads.weight = dw_acc
    if need_b:
        grads.bias = db_part.sum(dim=(0, 1))  # (D_out,) float32
    return loss_part.sum(), grads  # the partials carry the scale


_MM_OUT_DTYPE_OK: dict[str, bool] = {}


def _gemm_float32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` of 16-bit operands as a float32 result (no rounding to 16 bits, which could
    overflow: float16 gradients are kept without a mean's 1/count, so a sum over many rows may
    exceed 65504, or lose bits).

    A 16-bit GEMM with a float32 output where torch offers one (``torch.mm(..., out_dtype=)``,
    CUDA), else float32 operands, which is slower and costs two casts: when a device that should
    have it refuses, a warning says so once and the stage records it (``notes``).
    """
    dev = a.device.type
    if _MM_OUT_DTYPE_OK.get(dev, dev == "cuda"):
        try:
            return torch.mm(a, b, out_dtype=torch.float32)
        except (RuntimeError, TypeError, NotImplementedError) as e:
            _MM_OUT_DTYPE_OK[dev] = False
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            note(f"imitation loss: torch.mm(..., out_dtype=float32) failed on {dev} with torch "
                 f"{torch.__version__} ({type(e).__name__}: {first[:160]}); its 16-bit gradient "
                 f"GEMMs run on float32 copies of the operands instead (slower, same result)")
    return torch.mm(a.float(), b.float())


def _accumulate_gemm(acc: torch.Tensor | None, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``acc (float32) += a @ b``; allocates acc on first use."""
    if a.dtype == torch.float32:
        if acc is None:
            return torch.mm(a, b)
        return acc.addmm_(a, b)
    prod = _gemm_float32(a, b)
    if acc is None:
        return prod
    return acc.add_(prod)
