"""Triton kernels of the fused imitation loss, and their launchers.

Importing this module imports triton; :mod:`gwtn_dist.kernels` only imports it on first use, so
the package works (reference backend) without triton or a GPU.

Kernels (all accumulate in float32 whatever the input dtype):

* ``_linear_mse_kernel`` - for one chunk of rows, one (BLOCK_M x BLOCK_N) tile of
  ``y = x @ W.T`` per program (tl.dot over D_in), then in registers: ``+ bias + residual
  - target``, row mask, the tile's sum of squares, and the gradient ``g = 2 (y - t)`` (times the
  loss scale when FOLD_SCALE) written to a chunk buffer (and to d_residual); per-tile column sums
  of g give d_bias partials. y itself is never written to memory.
* ``_eltwise_mse_kernel`` - the equal-width case (no weight): one read of x, residual and target,
  one write of the gradient (dx, and d_residual when wanted), plus per-tile loss partials.
* ``_scale_grad_kernel`` - backward: multiply a stored gradient by grad_output (and by the loss
  scale the forward left out) in float32, then round it to the gradient's dtype; in place, it
  returns at once when the factor is exactly 1 (the usual case for float32 and bfloat16), so
  backward then costs no pass over the gradients and no host sync.

Why the loss scale may be left to backward: a stored gradient is rounded to its dtype before
grad_output is known. For a mean, ``2 (y - t) / count`` is tiny (4e-8 for |y - t| = 1e-3 and
48k elements); float32 and bfloat16 hold it fine (their smallest normal is 1e-38), but float16
flushes it to zero or a few subnormal bits (smallest subnormal 6e-8), and a loss scale of 2**16
applied afterwards cannot bring the bits back. So float16 gradients are stored as ``2 (y - t)``
(sum-reduction size) and multiplied by ``scale * grad_output`` before their one rounding.

Partial sums go to small float32 buffers reduced by torch afterwards (deterministic, unlike
atomics). Tensors shaped like y are addressed as ``(outer, inner, feature)`` with explicit strides
(see ``layout.rows3d``): 2-D, 3-D, channels-first and channels-last inputs are read in place.

The interpreter (``TRITON_INTERPRET=1``, CPU) is decided when this module is imported; it stores
bfloat16 as raw uint16, so ``UPCAST_DOT`` makes tl.dot operands float32 there (exact products,
float32 accumulation: the same numbers a GPU tensor core produces, up to summation order).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# Whether the @triton.jit functions below were built for the CPU interpreter (fixed at import).
INTERPRETED: bool = bool(triton.knobs.runtime.interpret)

# ---------------------------------------------------------------------------------------------
# Launch configurations
# ---------------------------------------------------------------------------------------------

# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) for the fused linear kernel on GPU; the
# autotuner picks one per (D_in, D_out, dtypes). The epilogue holds the accumulator plus target
# / residual tiles in registers, so tiles stay at <= 64 accumulator values per thread: checked by
# compiling for sm_90 (128x256 tiles or 4-warp 128x128 tiles spilled). float32 inputs use
# BLOCK_K = 32 to fit shared memory; the other list is pruned by dtype.
_GPU_LINEAR_TILES = {
    "16bit": [
        (128, 128, 64, 8, 3),
        (128, 128, 64, 8, 4),
        (64, 256, 64, 8, 3),
        (64, 128, 64, 4, 4),
        (128, 64, 64, 4, 4),
    ],
    "32bit": [
        (128, 128, 32, 8, 3),
        (64, 128, 32, 4, 4),
        (128, 64, 32, 4, 4),
        (64, 64, 32, 4, 4),
    ],
}
# Small tiles keep the interpreter quick and let tests cover several tiles on small shapes.
_INTERPRETER_LINEAR_TILES = {"16bit": [(32, 32, 32, 4, 1)], "32bit": [(32, 32, 32, 4, 1)]}
_LINEAR_TILES = _INTERPRETER_LINEAR_TILES if INTERPRETED else _GPU_LINEAR_TILES
_ALL_TILES = list(dict.fromkeys(t for tiles in _LINEAR_TILES.values() for t in tiles))

# Partial-sum buffers of the linear kernel are indexed in units of the smallest tile, so every
# autotuned tile size writes into distinct slots; unused slots stay zero.
LINEAR_PART_M = min(t[0] for t in _ALL_TILES)
LINEAR_PART_N = min(t[1] for t in _ALL_TILES)
GROUP_M = 8  # programs along M that share W tiles in L2 (grouped launch order)


def _linear_configs() -> list[triton.Config]:
    return [
        triton.Config(
            {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": GROUP_M},
            num_warps=warps,
            num_stages=stages,
        )
        for bm, bn, bk, warps, stages in _ALL_TILES
    ]


def _prune_by_dtype(configs, named_args, **kwargs):
    """Keep the tiles meant for x's element size (BLOCK_K 32 for float32, 64 for 16-bit)."""
    key = "32bit" if named_args["x_ptr"].element_size() == 4 else "16bit"
    wanted = {(t[0], t[1], t[2], t[3], t[4]) for t in _LINEAR_TILES[key]}
    return [
        c for c in configs
        if (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"], c.num_warps,
            c.num_stages) in wanted
    ]


# ---------------------------------------------------------------------------------------------
# (a) fused linear + bias + residual + squared error + gradient of y
# ---------------------------------------------------------------------------------------------


@triton.autotune(
    configs=_linear_configs(),
    key=["D_in", "D_out"],
    prune_configs_by={"early_config_prune": _prune_by_dtype},
    # Trial runs with other tile sizes write other partial slots: zero them after tuning.
    reset_to_zero=["loss_part_ptr", "db_part_ptr"],
)
@triton.heuristics({"EVEN_K": lambda args: args["D_in"] % args["BLOCK_K"] == 0})
@triton.jit
def _linear_mse_kernel(
    x_ptr, w_ptr, b_ptr, r_ptr, t_ptr, mask_ptr, scale_ptr,  # inputs
    g_ptr, dr_ptr, loss_part_ptr, db_part_ptr,  # outputs
    row_start, n_rows, inner, D_in, D_out,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_b,
    stride_ro, stride_ri, stride_rn,
    stride_to, stride_ti, stride_tn,
    stride_dro, stride_dri, stride_drn,
    stride_gm, n_part_n, scale,
    HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr, HAS_MASK: tl.constexpr,
    SCALE_FROM_PTR: tl.constexpr, FOLD_SCALE: tl.constexpr,
    WRITE_G: tl.constexpr, WRITE_DR: tl.constexpr, WRITE_DB: tl.constexpr,
    UPCAST_DOT: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    PART_M: tl.constexpr, PART_N: tl.constexpr, INDEX_64: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr, EVEN_K: tl.constexpr,
):
    """Rows [row_start, row_start + n_rows) of x (M, D_in) against W (D_out, D_in).

    Outputs (chunk-local): g (n_rows, D_out) row stride stride_gm; loss_part (rows of PART_M,
    cols of PART_N) float32; db_part (rows of PART_M, D_out) float32.
    """
    # Grouped ordering: GROUP_M consecutive programs walk down M for one N tile, so the W tile
    # (BLOCK_K x BLOCK_N slices) is reused from L2.
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(n_rows, BLOCK_M)
    num_pid_n = tl.cdiv(D_out, BLOCK_N)
    num_pid_in_group = GROUP_M * num_pid_n
    first_pid_m = (pid // num_pid_in_group) * GROUP_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # (BM,) chunk-local rows
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # (BN,) output features
    offs_k = tl.arange(0, BLOCK_K)
    m_ok = offs_m < n_rows
    n_ok = offs_n < D_out

    # Main loop: acc (BM, BN) = x[rows, :] @ W[cols, :].T. Rows/cols past the edge wrap around
    # (modulo) instead of being masked, so the hot loop only masks K; the epilogue drops them.
    rows_ld = row_start + offs_m % n_rows
    cols_ld = offs_n % D_out
    if INDEX_64:
        rows_ld = rows_ld.to(tl.int64)
        cols_ld = cols_ld.to(tl.int64)
    x_ptrs = x_ptr + rows_ld[:, None] * stride_xm + offs_k[None, :] * stride_xk  # (BM, BK)
    w_ptrs = w_ptr + offs_k[:, None] * stride_wk + cols_ld[None, :] * stride_wn  # (BK, BN)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(tl.cdiv(D_in, BLOCK_K)):
        if EVEN_K:
            a = tl.load(x_ptrs)
            b = tl.load(w_ptrs)
        else:
            k_ok = offs_k < D_in - k * BLOCK_K
            a = tl.load(x_ptrs, mask=k_ok[None, :], other=0.0)
            b = tl.load(w_ptrs, mask=k_ok[:, None], other=0.0)
        if UPCAST_DOT:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
        x_ptrs += BLOCK_K * stride_xk
        w_ptrs += BLOCK_K * stride_wk

    # Epilogue, all in registers: y = acc + bias + residual; diff = y - target on counted rows.
    tile_ok = m_ok[:, None] & n_ok[None, :]
    rows = row_start + offs_m  # global row = outer * inner + inner_index
    local_rows = offs_m
    cols = offs_n
    if INDEX_64:
        rows = rows.to(tl.int64)
        local_rows = local_rows.to(tl.int64)
        cols = cols.to(tl.int64)
    outer = rows // inner
    in_idx = rows - outer * inner
    y = acc
    if HAS_BIAS:
        y += tl.load(b_ptr + cols * stride_b, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    if HAS_RES:
        r_ptrs = r_ptr + (outer * stride_ro + in_idx * stride_ri)[:, None] + cols[None, :] * stride_rn
        y += tl.load(r_ptrs, mask=tile_ok, other=0.0).to(tl.float32)
    t_ptrs = t_ptr + (outer * stride_to + in_idx * stride_ti)[:, None] + cols[None, :] * stride_tn
    t = tl.load(t_ptrs, mask=tile_ok, other=0.0).to(tl.float32)
    keep = tile_ok
    if HAS_MASK:
        row_counts = tl.load(mask_ptr + rows, mask=m_ok, other=0) != 0
        keep = keep & row_counts[:, None]
    # where(), not a multiply: garbage (even NaN) in ignored rows cannot leak.
    diff = tl.where(keep, y - t, 0.0)

    part_row = (pid_m * BLOCK_M) // PART_M
    part_col = (pid_n * BLOCK_N) // PART_N
    tl.store(loss_part_ptr + part_row * n_part_n + part_col, tl.sum(diff * diff))

    if WRITE_G or WRITE_DR or WRITE_DB:
        if FOLD_SCALE:  # d loss / d y, float32 (BM, BN)
            if SCALE_FROM_PTR:
                s = tl.load(scale_ptr)
            else:
                s = scale
            g = diff * (2.0 * s)
        else:  # d (sum of squares) / d y: backward applies the scale (see the module docstring)
            g = diff * 2.0
        if WRITE_G:
            g_ptrs = g_ptr + local_rows[:, None] * stride_gm + cols[None, :]
            tl.store(g_ptrs, g.to(g_ptr.dtype.element_ty), mask=tile_ok)
        if WRITE_DR:
            dr_ptrs = (dr_ptr + (outer * stride_dro + in_idx * stride_dri)[:, None]
                       + cols[None, :] * stride_drn)
            tl.store(dr_ptrs, g.to(dr_ptr.dtype.element_ty), mask=tile_ok)
        if WRITE_DB:
            tl.store(db_part_ptr + part_row * D_out + cols, tl.sum(g, axis=0), mask=n_ok)


# ---------------------------------------------------------------------------------------------
# (b) fused elementwise squared error + gradient (no weight: y = x [+ residual])
# ---------------------------------------------------------------------------------------------


@triton.jit
def _eltwise_mse_kernel(
    x_ptr, r_ptr, t_ptr, mask_ptr, scale_ptr,  # inputs
    dx_ptr, dr_ptr, loss_part_ptr,  # outputs
    n_rows, inner, D,
    stride_xo, stride_xi, stride_xn,
    stride_ro, stride_ri, stride_rn,
    stride_to, stride_ti, stride_tn,
    stride_dxo, stride_dxi, stride_dxn,
    stride_dro, stride_dri, stride_drn,
    scale,
    HAS_RES: tl.constexpr, HAS_MASK: tl.constexpr, SCALE_FROM_PTR: tl.constexpr,
    FOLD_SCALE: tl.constexpr, WRITE_DX: tl.constexpr, WRITE_DR: tl.constexpr, INDEX_64: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """One (BLOCK_M rows x BLOCK_D features) tile; loss_part is (grid_m, grid_d) float32."""
    pid_m = tl.program_id(0)
    pid_d = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    if INDEX_64:
        rows = rows.to(tl.int64)
        cols = cols.to(tl.int64)
    m_ok = rows < n_rows
    tile_ok = m_ok[:, None] & (cols < D)[None, :]
    outer = rows // inner
    in_idx = rows - outer * inner

    x_ptrs = x_ptr + (outer * stride_xo + in_idx * stride_xi)[:, None] + cols[None, :] * stride_xn
    y = tl.load(x_ptrs, mask=tile_ok, other=0.0).to(tl.float32)
    if HAS_RES:
        r_ptrs = r_ptr + (outer * stride_ro + in_idx * stride_ri)[:, None] + cols[None, :] * stride_rn
        y += tl.load(r_ptrs, mask=tile_ok, other=0.0).to(tl.float32)
    t_ptrs = t_ptr + (outer * stride_to + in_idx * stride_ti)[:, None] + cols[None, :] * stride_tn
    t = tl.load(t_ptrs, mask=tile_ok, other=0.0).to(tl.float32)
    keep = tile_ok
    if HAS_MASK:
        row_counts = tl.load(mask_ptr + rows, mask=m_ok, other=0) != 0
        keep = keep & row_counts[:, None]
    diff = tl.where(keep, y - t, 0.0)
    tl.store(loss_part_ptr + pid_m * tl.num_programs(1) + pid_d, tl.sum(diff * diff))

    if WRITE_DX or WRITE_DR:
        if FOLD_SCALE:
            if SCALE_FROM_PTR:
                s = tl.load(scale_ptr)
            else:
                s = scale
            g = diff * (2.0 * s)
        else:
            g = diff * 2.0
        if WRITE_DX:
            dx_ptrs = (dx_ptr + (outer * stride_dxo + in_idx * stride_dxi)[:, None]
                       + cols[None, :] * stride_dxn)
            tl.store(dx_ptrs, g.to(dx_ptr.dtype.element_ty), mask=tile_ok)
        if WRITE_DR:
            dr_ptrs = (dr_ptr + (outer * stride_dro + in_idx * stride_dri)[:, None]
                       + cols[None, :] * stride_drn)
            tl.store(dr_ptrs, g.to(dr_ptr.dtype.element_ty), mask=tile_ok)


# ---------------------------------------------------------------------------------------------
# backward: scaling by grad_output (and the loss scale the forward left out)
# ---------------------------------------------------------------------------------------------


@triton.jit
def _scale_block(src_ptr, dst_ptr, n, factor, BLOCK: tl.constexpr):
    """dst[block] = src[block] * factor, computed in float32, rounded once to dst's dtype."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < n
    v = tl.load(src_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    tl.store(dst_ptr + offs, (v * factor).to(dst_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _scale_grad_kernel(
    src_ptr, dst_ptr, n, go_ptr, scale_ptr, scale,
    SCALE_FROM_PTR: tl.constexpr, IN_PLACE: tl.constexpr, BLOCK: tl.constexpr,
):
    if SCALE_FROM_PTR:
        s = tl.load(scale_ptr)
    else:
        s = scale
    factor = tl.load(go_ptr).to(tl.float32) * s
    if IN_PLACE:
        if factor != 1.0:  # the common factor 1 costs one scalar load per program
            _scale_block(src_ptr, dst_ptr, n, factor, BLOCK)
    else:
        _scale_block(src_ptr, dst_ptr, n, factor, BLOCK)


# ---------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------


def _strides3(t: torch.Tensor | None) -> tuple[int, int, int]:
    """Strides of an (outer, inner, feature) view, or zeros for an absent tensor."""
    return tuple(t.stride()) if t is not None else (0, 0, 0)


def _needs_int64(*tensors: torch.Tensor | None) -> bool:
    """Whether some element offset may reach 2**31 (then kernels index in int64)."""
    for t in tensors:
        if t is not None and t.numel() > 0:
            span = 1 + sum((n - 1) * abs(st) for n, st in zip(t.shape, t.stride()))
            if span >= 2**31 - 1:
                return True
    return False


def _dot_precision(dtype: torch.dtype) -> str:
    # Match torch's matmul: float32 uses TF32 tensor cores only when torch allows it.
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32" if dtype == torch.float32 else "ieee"  # ignored for 16-bit inputs


def linear_partial_shapes(n_rows: int, d_out: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """Shapes of the (loss, d_bias) partial buffers for one chunk of ``n_rows`` rows."""
    part_rows = triton.cdiv(n_rows, LINEAR_PART_M)
    return (part_rows, triton.cdiv(d_out, LINEAR_PART_N)), (part_rows, d_out)


def launch_linear_mse(
    x2d: torch.Tensor,  # (M, D_in), any strides
    weight: torch.Tensor,  # (D_out, D_in), any strides
    bias: torch.Tensor | None,  # (D_out,)
    r3: torch.Tensor | None,  # residual (outer, inner, D_out)
    t3: torch.Tensor,  # target (outer, inner, D_out)
    mask: torch.Tensor | None,  # (M,) uint8
    scale: float | torch.Tensor,  # loss scale: python float, or a 1-element float32 tensor
    fold_scale: bool,  # multiply the written gradients by scale (else backward does)
    row_start: int,
    n_rows: int,
    inner: int,
    g: torch.Tensor | None,  # (>= n_rows, D_out) contiguous rows, or None if not wanted
    dr3: torch.Tensor | None,  # d_residual (outer, inner, D_out), or None
    loss_part: torch.Tensor,  # float32, linear_partial_shapes(...)[0], zero-filled
    db_part: torch.Tensor | None,  # float32, linear_partial_shapes(...)[1], zero-filled, or None
) -> None:
    """Run kernel (a) on rows [row_start, row_start + n_rows)."""
    d_out, d_in = weight.shape
    from_ptr = isinstance(scale, torch.Tensor)

    def grid(meta):
        return (triton.cdiv(n_rows, meta["BLOCK_M"]) * triton.cdiv(d_out, meta["BLOCK_N"]),)

    _linear_mse_kernel[grid](
        x2d, weight, bias, r3, t3, mask, scale if from_ptr else None,
        g, dr3, loss_part, db_part,
        row_start, n_rows, inner, d_in, d_out,
        x2d.stride(0), x2d.stride(1), weight.stride(0), weight.stride(1),
        bias.stride(0) if bias is not None else 0,
        *_strides3(r3), *_strides3(t3), *_strides3(dr3),
        g.stride(0) if g is not None else 0,
        loss_part.shape[1],
        0.0 if from_ptr else float(scale),
        HAS_BIAS=bias is not None, HAS_RES=r3 is not None, HAS_MASK=mask is not None,
        SCALE_FROM_PTR=from_ptr, FOLD_SCALE=fold_scale,
        WRITE_G=g is not None, WRITE_DR=dr3 is not None, WRITE_DB=db_part is not None,
        UPCAST_DOT=INTERPRETED, INPUT_PRECISION=_dot_precision(x2d.dtype),
        PART_M=LINEAR_PART_M, PART_N=LINEAR_PART_N,
        INDEX_64=_needs_int64(x2d, weight, r3, t3, g, dr3, mask),
    )


def eltwise_blocks(n_rows: int, d: int) -> tuple[int, int]:
    """Tile (BLOCK_M, BLOCK_D): whole feature rows up to 256 wide, ~4k elements per program."""
    block_d = min(triton.next_power_of_2(max(d, 1)), 256)
    block_m = max(1, min(4096 // block_d, triton.next_power_of_2(max(n_rows, 1))))
    return block_m, block_d


def launch_eltwise_mse(
    x3: torch.Tensor,  # (outer, inner, D)
    r3: torch.Tensor | None,
    t3: torch.Tensor,
    mask: torch.Tensor | None,  # (M,) uint8
    scale: float | torch.Tensor,
    fold_scale: bool,
    n_rows: int,
    inner: int,
    dx3: torch.Tensor | None,
    dr3: torch.Tensor | None,
) -> torch.Tensor:
    """Run kernel (b); returns the float32 loss partials (to be summed)."""
    d = x3.shape[-1]
    block_m, block_d = eltwise_blocks(n_rows, d)
    grid = (triton.cdiv(n_rows, block_m), triton.cdiv(d, block_d))
    loss_part = torch.empty(grid, dtype=torch.float32, device=x3.device)  # every slot written
    from_ptr = isinstance(scale, torch.Tensor)
    _eltwise_mse_kernel[grid](
        x3, r3, t3, mask, scale if from_ptr else None,
        dx3, dr3, loss_part,
        n_rows, inner, d,
        *_strides3(x3), *_strides3(r3), *_strides3(t3), *_strides3(dx3), *_strides3(dr3),
        0.0 if from_ptr else float(scale),
        HAS_RES=r3 is not None, HAS_MASK=mask is not None, SCALE_FROM_PTR=from_ptr,
        FOLD_SCALE=fold_scale, WRITE_DX=dx3 is not None, WRITE_DR=dr3 is not None,
        INDEX_64=_needs_int64(x3, r3, t3, dx3, dr3, mask),
        BLOCK_M=block_m, BLOCK_D=block_d,
        num_warps=4,
    )
    return loss_part


_SCALE_BLOCK = 4096


def _is_dense(t: torch.Tensor) -> bool:
    """True if t's elements fill exactly numel consecutive slots (any dim order)."""
    expected = 1
    for stride, size in sorted((st, sz) for st, sz in zip(t.stride(), t.shape) if sz > 1):
        if stride != expected:
            return False
        expected *= size
    return True


def scale_grad(
    buf: torch.Tensor,
    grad_output: torch.Tensor,
    scale: float | torch.Tensor,
    dtype: torch.dtype,
) -> torch.Tensor:
    """``buf * grad_output * scale`` in float32, rounded once to ``dtype``.

    When buf already has ``dtype`` the result is written in place (and the pass is skipped on
    the device when the factor is 1); otherwise (a float32 buffer of a 16-bit gradient) into a
    new tensor with buf's shape and layout. ``scale`` is a python float or a 1-element float32
    tensor (a masked mean's, on the device).
    """
    in_place = buf.dtype == dtype
    out = buf if in_place else torch.empty_like(buf, dtype=dtype)
    n = buf.numel()
    if n == 0:
        return out
    if not _is_dense(buf) or out.stride() != buf.stride():
        raise ValueError("scale_grad needs a dense buffer (no gaps, no overlaps)")
    # A dense (non-overlapping, gap-free) tensor of any strides is numel elements from data_ptr,
    # in the same order for out (same strides).
    src = buf.as_strided((n,), (1,))
    dst = out.as_strided((n,), (1,))
    go = grad_output.reshape(1)
    from_ptr = isinstance(scale, torch.Tensor)
    _scale_grad_kernel[(triton.cdiv(n, _SCALE_BLOCK),)](
        src, dst, n, go, scale if from_ptr else None, 0.0 if from_ptr else float(scale),
        SCALE_FROM_PTR=from_ptr, IN_PLACE=in_place, BLOCK=_SCALE_BLOCK,
    )
    return out
