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
* ``_finish_grads_kernel`` - backward, one launch for all (up to 4) gradients: multiply each by
  grad_output (and by the loss scale the forward left out) in float32, then round it to the
  gradient's dtype. In place, a block returns at once when the factor is exactly 1 (the usual
  case for float32 and bfloat16), so backward then costs no pass over dx and no host sync.

The two forward kernels share ``_masked_diff`` (residual, target, row mask -> y - t) and
``_loss_scale``: the loss scale is 1 (sum), 1/count (mean) or, for a masked mean, 1/D_out divided
by the count of kept rows, read on the device from one ``mask.sum()`` (no host sync). Loss
partials are stored already scaled, so the loss is one torch sum of them.

Why the loss scale may be left to backward: a stored gradient is rounded to its dtype before
grad_output is known. For a mean, ``2 (y - t) / count`` is tiny (4e-8 for |y - t| = 1e-3 and
48k elements); float32 and bfloat16 hold it fine (their smallest normal is 1e-38), but float16
flushes it to zero or a few subnormal bits (smallest subnormal 6e-8), and a loss scale of 2**16
applied afterwards cannot bring the bits back. So float16 gradients are kept as ``2 (y - t)``
(sum-reduction size) and multiplied by ``scale * grad_output`` before their one rounding. The
kept dx and d_residual are float32 (``fused.grad_buffer_dtype``): at sum-reduction size they can
exceed float16's 65504 where the final, scaled gradient does not (a mean over more elements than
the loss scale), and an inf stored there would survive every loss scale a GradScaler tries.

Tiles of the linear kernel: autotuned per (D_in, D_out, rows-per-chunk bucket, dtypes), or one
fixed tile per dtype (``pinned_tiles``): when ``GWTN_PIN_TILES=1`` (the GPU check's tests: one
compile per specialisation instead of one per candidate tile) and whenever several ranks train,
since each rank would tune by its own timings and could pick another tile, and with it another
summation order, so the ranks' losses would differ in their last bits.

Partial sums go to small float32 buffers reduced by torch afterwards (deterministic, unlike
atomics). Tensors shaped like y are addressed as ``(outer, inner, feature)`` with explicit strides
(see ``layout.rows3d``): 2-D, 3-D, channels-first and channels-last inputs are read in place.

The interpreter (``TRITON_INTERPRET=1``, CPU) is decided when this module is imported; it stores
bfloat16 as raw uint16, so ``UPCAST_DOT`` makes tl.dot operands float32 there (exact products,
float32 accumulation: the same numbers a GPU tensor core produces, up to summation order).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
import triton
import triton.language as tl

# Whether the @triton.jit functions below were built for the CPU interpreter (fixed at import).
INTERPRETED: bool = bool(triton.knobs.runtime.interpret)

# ---------------------------------------------------------------------------------------------
# Launch configurations
# ---------------------------------------------------------------------------------------------

# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) for the fused linear kernel on GPU; the
# autotuner picks one per (D_in, D_out, rows bucket, dtypes). The epilogue holds the accumulator
# plus target / residual tiles in registers, so tiles stay at <= 64 accumulator values per
# thread: checked by compiling for sm_90 (128x256 tiles or 4-warp 128x128 tiles spilled).
# float32 inputs use BLOCK_K = 32 to fit shared memory; the other list is pruned by dtype.
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


PIN_TILES_ENV = "GWTN_PIN_TILES"
_TRUTHY = {"1", "true", "yes", "on", "y"}


def pinned_tiles() -> bool:
    """Whether the linear kernel runs its fixed tile (the dtype's first) instead of autotuning.

    True with ``GWTN_PIN_TILES=1`` and whenever this process is one of several ranks: the tile
    decides the order of the loss's partial sums, and ranks tuning on their own timings could
    choose different ones (hence losses that differ in their last bits across ranks).
    """
    if os.environ.get(PIN_TILES_ENV, "").strip().lower() in _TRUTHY:
        return True
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def pinned_tile(element_size: int) -> tuple[int, int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) of the fixed tile for x's element
    size: the first of the dtype's list, a 128x128 tile that suits training-sized problems."""
    return _LINEAR_TILES["32bit" if element_size == 4 else "16bit"][0]


# Autotuning keys on the rows of a chunk rounded up to a power of two (at least 128): the best
# tile for a thousand rows is not the best for 64k, and a bucket rather than the exact count
# keeps the tunings few (a call's chunks share one: the last, shorter chunk uses the call's).
MIN_ROWS_BUCKET = 128


def rows_bucket(rows: int) -> int:
    """The autotuning key's row count: ``rows`` rounded up to a power of two, >= 128."""
    return max(MIN_ROWS_BUCKET, triton.next_power_of_2(max(rows, 1)))


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
# shared pieces of the forward kernels
# ---------------------------------------------------------------------------------------------


@triton.jit
def _rows3d_offsets(rows, cols, inner, stride_o, stride_i, stride_n):
    """Element offsets (BM, BN) of rows x cols in an (outer, inner, feature) strided view.

    rows (BM,) are global row indices ``outer * inner + inner_index``; cols (BN,) features.
    """
    outer = rows // inner
    in_idx = rows - outer * inner
    return (outer * stride_o + in_idx * stride_i)[:, None] + cols[None, :] * stride_n


@triton.jit
def _masked_diff(
    y, rows, cols, m_ok, tile_ok, inner,
    r_ptr, stride_ro, stride_ri, stride_rn,
    t_ptr, stride_to, stride_ti, stride_tn,
    mask_ptr,
    HAS_RES: tl.constexpr, HAS_MASK: tl.constexpr,
):
    """``y + residual - target`` on one tile, float32 (BM, BN), exactly 0 where not counted.

    y (BM, BN) float32; rows (BM,) global rows with m_ok (BM,) their bound check; cols (BN,);
    tile_ok (BM, BN) the in-bounds elements. Not counted: out of bounds, or a row whose mask
    byte is 0. where(), not a multiply: garbage (even NaN) in ignored rows cannot leak.
    """
    if HAS_RES:
        r_offs = _rows3d_offsets(rows, cols, inner, stride_ro, stride_ri, stride_rn)
        y += tl.load(r_ptr + r_offs, mask=tile_ok, other=0.0).to(tl.float32)
    t_offs = _rows3d_offsets(rows, cols, inner, stride_to, stride_ti, stride_tn)
    t = tl.load(t_ptr + t_offs, mask=tile_ok, other=0.0).to(tl.float32)
    keep = tile_ok
    if HAS_MASK:
        row_kept = tl.load(mask_ptr + rows, mask=m_ok, other=0) != 0  # (BM,)
        keep = keep & row_kept[:, None]
    return tl.where(keep, y - t, 0.0)


@triton.jit
def _loss_scale(scale, count_ptr, HAS_COUNT: tl.constexpr):
    """The loss scale: ``scale``, or with a count on the device ``scale / count`` (0 if none).

    A masked mean passes scale = 1/D_out and the number of kept rows (int64, one element).
    """
    s = scale
    if HAS_COUNT:
        count = tl.load(count_ptr).to(tl.float32)
        s = tl.where(count > 0, scale / tl.maximum(count, 1.0), 0.0)
    return s


@triton.jit
def _grad_of_y(diff, s, FOLD_SCALE: tl.constexpr):
    """The gradient to store: d loss / d y = 2 (y - t) s, or 2 (y - t) when backward scales."""
    if FOLD_SCALE:
        g = diff * (2.0 * s)
    else:  # float16: s would push it under float16's range (see the module docstring)
        g = diff * 2.0
    return g


# ---------------------------------------------------------------------------------------------
# (a) fused linear + bias + residual + squared error + gradient of y
# ---------------------------------------------------------------------------------------------


@triton.autotune(
    configs=_linear_configs(),
    key=["D_in", "D_out", "M_BUCKET"],  # and the dtypes of the tensor arguments (triton adds them)
    prune_configs_by={"early_config_prune": _prune_by_dtype},
    # Trial runs with other tile sizes write other partial slots: zero them after tuning. Both
    # are always tensors (a dummy when d_bias is not wanted): several triton releases zero
    # every named argument without looking, and None.zero_() raises.
    reset_to_zero=["loss_part_ptr", "db_part_ptr"],
)
@triton.heuristics({"EVEN_K": lambda args: args["D_in"] % args["BLOCK_K"] == 0})
@triton.jit
def _linear_mse_kernel(
    x_ptr, w_ptr, b_ptr, r_ptr, t_ptr, mask_ptr, count_ptr,  # inputs
    g_ptr, dr_ptr, loss_part_ptr, db_part_ptr,  # outputs
    row_start, n_rows, inner, D_in, D_out, M_BUCKET,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_b,
    stride_ro, stride_ri, stride_rn,
    stride_to, stride_ti, stride_tn,
    stride_dro, stride_dri, stride_drn,
    stride_gm, n_part_n, scale,
    HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr, HAS_MASK: tl.constexpr,
    HAS_COUNT: tl.constexpr, FOLD_SCALE: tl.constexpr,
    WRITE_G: tl.constexpr, WRITE_DR: tl.constexpr, WRITE_DB: tl.constexpr,
    UPCAST_DOT: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    PART_M: tl.constexpr, PART_N: tl.constexpr, INDEX_64: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr, EVEN_K: tl.constexpr,
):
    """Rows [row_start, row_start + n_rows) of x (M, D_in) against W (D_out, D_in).

    Outputs (chunk-local): g (n_rows, D_out) row stride stride_gm; loss_part (rows of PART_M,
    cols of PART_N) float32, already times the loss scale; db_part (rows of PART_M, D_out)
    float32, column sums of g. M_BUCKET is read by the autotuner only (``rows_bucket``).
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

    # Epilogue, all in registers: y = acc + bias (+ residual); diff = y - target on counted rows.
    tile_ok = m_ok[:, None] & n_ok[None, :]
    rows = row_start + offs_m  # global row = outer * inner + inner_index
    local_rows = offs_m
    cols = offs_n
    if INDEX_64:
        rows = rows.to(tl.int64)
        local_rows = local_rows.to(tl.int64)
        cols = cols.to(tl.int64)
    y = acc
    if HAS_BIAS:
        y += tl.load(b_ptr + cols * stride_b, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    diff = _masked_diff(
        y, rows, cols, m_ok, tile_ok, inner,
        r_ptr, stride_ro, stride_ri, stride_rn,
        t_ptr, stride_to, stride_ti, stride_tn,
        mask_ptr, HAS_RES, HAS_MASK,
    )
    s = _loss_scale(scale, count_ptr, HAS_COUNT)

    part_row = (pid_m * BLOCK_M) // PART_M
    part_col = (pid_n * BLOCK_N) // PART_N
    tl.store(loss_part_ptr + part_row * n_part_n + part_col, tl.sum(diff * diff) * s)

    if WRITE_G or WRITE_DR or WRITE_DB:
        g = _grad_of_y(diff, s, FOLD_SCALE)  # float32 (BM, BN)
        if WRITE_G:
            g_ptrs = g_ptr + local_rows[:, None] * stride_gm + cols[None, :]
            tl.store(g_ptrs, g.to(g_ptr.dtype.element_ty), mask=tile_ok)
        if WRITE_DR:
            dr_offs = _rows3d_offsets(rows, cols, inner, stride_dro, stride_dri, stride_drn)
            tl.store(dr_ptr + dr_offs, g.to(dr_ptr.dtype.element_ty), mask=tile_ok)
        if WRITE_DB:
            tl.store(db_part_ptr + part_row * D_out + cols, tl.sum(g, axis=0), mask=n_ok)


# ---------------------------------------------------------------------------------------------
# (b) fused elementwise squared error + gradient (no weight: y = x [+ residual])
# ---------------------------------------------------------------------------------------------


@triton.jit
def _eltwise_mse_kernel(
    x_ptr, r_ptr, t_ptr, mask_ptr, count_ptr,  # inputs
    dx_ptr, dr_ptr, loss_part_ptr,  # outputs
    n_rows, inner, D,
    stride_xo, stride_xi, stride_xn,
    stride_ro, stride_ri, stride_rn,
    stride_to, stride_ti, stride_tn,
    stride_dxo, stride_dxi, stride_dxn,
    stride_dro, stride_dri, stride_drn,
    scale,
    HAS_RES: tl.constexpr, HAS_MASK: tl.constexpr, HAS_COUNT: tl.constexpr,
    FOLD_SCALE: tl.constexpr, WRITE_DX: tl.constexpr, WRITE_DR: tl.constexpr,
    INDEX_64: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
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

    x_offs = _rows3d_offsets(rows, cols, inner, stride_xo, stride_xi, stride_xn)
    y = tl.load(x_ptr + x_offs, mask=tile_ok, other=0.0).to(tl.float32)
    diff = _masked_diff(
        y, rows, cols, m_ok, tile_ok, inner,
        r_ptr, stride_ro, stride_ri, stride_rn,
        t_ptr, stride_to, stride_ti, stride_tn,
        mask_ptr, HAS_RES, HAS_MASK,
    )
    s = _loss_scale(scale, count_ptr, HAS_COUNT)
    tl.store(loss_part_ptr + pid_m * tl.num_programs(1) + pid_d, tl.sum(diff * diff) * s)

    if WRITE_DX or WRITE_DR:
        g = _grad_of_y(diff, s, FOLD_SCALE)
        if WRITE_DX:
            dx_offs = _rows3d_offsets(rows, cols, inner, stride_dxo, stride_dxi, stride_dxn)
            tl.store(dx_ptr + dx_offs, g.to(dx_ptr.dtype.element_ty), mask=tile_ok)
        if WRITE_DR:
            dr_offs = _rows3d_offsets(rows, cols, inner, stride_dro, stride_dri, stride_drn)
            tl.store(dr_ptr + dr_offs, g.to(dr_ptr.dtype.element_ty), mask=tile_ok)


# ---------------------------------------------------------------------------------------------
# backward: every gradient times grad_output (and the loss scale the forward left out)
# ---------------------------------------------------------------------------------------------


@triton.jit
def _scale_block(src_ptr, dst_ptr, n, block, factor, BLOCK: tl.constexpr):
    """Block ``block`` of one flat gradient: dst = src * factor in float32, rounded once to dst's
    dtype."""
    offs = block.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < n
    v = tl.load(src_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    tl.store(dst_ptr + offs, (v * factor).to(dst_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _finish_block(src_ptr, dst_ptr, n, block, factor, IN_PLACE: tl.constexpr,
                  BLOCK: tl.constexpr):
    """``_scale_block``, skipped in place (dst is src) when the factor is exactly 1."""
    if IN_PLACE:
        if factor != 1.0:  # the common factor 1 costs one scalar load per program
            _scale_block(src_ptr, dst_ptr, n, block, factor, BLOCK)
    else:
        _scale_block(src_ptr, dst_ptr, n, block, factor, BLOCK)


@triton.jit
def _finish_grads_kernel(
    src0, dst0, n0, src1, dst1, n1, src2, dst2, n2, src3, dst3, n3,
    end0, end1, end2,  # gradient i owns programs [end_{i-1}, end_i) (end_{-1} = 0)
    go_ptr, count_ptr, scale,
    N_GRADS: tl.constexpr,
    IN_PLACE0: tl.constexpr, IN_PLACE1: tl.constexpr, IN_PLACE2: tl.constexpr,
    IN_PLACE3: tl.constexpr,
    HAS_COUNT: tl.constexpr, BLOCK: tl.constexpr,
):
    """Up to 4 flat gradients in one launch; slots past N_GRADS are not compiled."""
    pid = tl.program_id(0)
    factor = tl.load(go_ptr).to(tl.float32) * _loss_scale(scale, count_ptr, HAS_COUNT)
    # The constexpr tests drop absent slots at compile time (their pointers are None).
    if pid < end0:
        _finish_block(src0, dst0, n0, pid, factor, IN_PLACE0, BLOCK)
    if N_GRADS > 1:
        mine = (pid >= end0) & (pid < end1)
        if mine:
            _finish_block(src1, dst1, n1, pid - end0, factor, IN_PLACE1, BLOCK)
    if N_GRADS > 2:
        mine = (pid >= end1) & (pid < end2)
        if mine:
            _finish_block(src2, dst2, n2, pid - end1, factor, IN_PLACE2, BLOCK)
    if N_GRADS > 3:
        mine = pid >= end2
        if mine:
            _finish_block(src3, dst3, n3, pid - end2, factor, IN_PLACE3, BLOCK)


# ---------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LossScale:
    """The factor turning the sum of squares into the loss, as the kernels take it.

    ``value`` alone (1 for a sum, 1/count for a mean), or, for a masked mean, ``value / count``
    (0 when count is 0) with ``value = 1/D_out`` and ``count`` the number of kept rows, an int64
    one-element device tensor that the kernels read (so the host never waits for it).
    """

    value: float
    count: torch.Tensor | None = None

    def kernel_args(self) -> tuple[torch.Tensor | None, float]:
        """(count_ptr, scale) arguments of the kernels; HAS_COUNT is ``count is not None``."""
        return self.count, float(self.value)


def _strides3(t: torch.Tensor | None) -> tuple[int, int, int]:
    """Strides of an (outer, inner, feature) view, or zeros for an absent tensor."""
    return tuple(t.stride()) if t is not None else (0, 0, 0)


def _needs_int64(*tensors: torch.Tensor | None) -> bool:
    """Whether some element offset may reach 2**31 (then kernels index in int64)."""
    for t in tensors:
        if t is not None and t.numel() > 0:
            span = 1 + sum((n - 1) * abs(st) for n, st in zip(t.shape, t.stride(), strict=True))
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


_PLACEHOLDERS: dict[torch.device, torch.Tensor] = {}


def _placeholder(device: torch.device) -> torch.Tensor:
    """A one-element float32 tensor on ``device`` that stands for an output not written."""
    if device not in _PLACEHOLDERS:
        _PLACEHOLDERS[device] = torch.zeros(1, dtype=torch.float32, device=device)
    return _PLACEHOLDERS[device]


def launch_linear_mse(
    x2d: torch.Tensor,  # (M, D_in), any strides
    weight: torch.Tensor,  # (D_out, D_in), any strides
    bias: torch.Tensor | None,  # (D_out,)
    r3: torch.Tensor | None,  # residual (outer, inner, D_out)
    t3: torch.Tensor,  # target (outer, inner, D_out)
    mask: torch.Tensor | None,  # (M,) uint8
    scale: LossScale,
    fold_scale: bool,  # multiply the written gradients by the scale (else backward does)
    row_start: int,
    n_rows: int,
    inner: int,
    g: torch.Tensor | None,  # (>= n_rows, D_out) contiguous rows, or None if not wanted
    dr3: torch.Tensor | None,  # d_residual (outer, inner, D_out), or None
    loss_part: torch.Tensor,  # float32, linear_partial_shapes(...)[0], zero-filled
    db_part: torch.Tensor | None,  # float32, linear_partial_shapes(...)[1], zero-filled, or None
    chunk: int | None = None,  # rows of the call's full chunks (the tuning key); n_rows if None
) -> None:
    """Run kernel (a) on rows [row_start, row_start + n_rows)."""
    d_out, d_in = weight.shape
    count, scale_value = scale.kernel_args()

    def grid(meta):
        return (triton.cdiv(n_rows, meta["BLOCK_M"]) * triton.cdiv(d_out, meta["BLOCK_N"]),)

    tile = {}
    kernel = _linear_mse_kernel
    if pinned_tiles():
        kernel = _linear_mse_kernel.fn  # the heuristics (EVEN_K) and the kernel, untuned
        bm, bn, bk, warps, stages = pinned_tile(x2d.element_size())
        tile = {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": GROUP_M,
                "num_warps": warps, "num_stages": stages}
    write_db = db_part is not None
    if db_part is None:  # never written (WRITE_DB is off), but the autotuner zeroes it
        db_part = _placeholder(x2d.device)
    kernel[grid](
        x2d, weight, bias, r3, t3, mask, count,
        g, dr3, loss_part, db_part,
        row_start, n_rows, inner, d_in, d_out, rows_bucket(chunk or n_rows),
        x2d.stride(0), x2d.stride(1), weight.stride(0), weight.stride(1),
        bias.stride(0) if bias is not None else 0,
        *_strides3(r3), *_strides3(t3), *_strides3(dr3),
        g.stride(0) if g is not None else 0,
        loss_part.shape[1],
        scale_value,
        HAS_BIAS=bias is not None, HAS_RES=r3 is not None, HAS_MASK=mask is not None,
        HAS_COUNT=count is not None, FOLD_SCALE=fold_scale,
        WRITE_G=g is not None, WRITE_DR=dr3 is not None, WRITE_DB=write_db,
        UPCAST_DOT=INTERPRETED, INPUT_PRECISION=_dot_precision(x2d.dtype),
        PART_M=LINEAR_PART_M, PART_N=LINEAR_PART_N,
        INDEX_64=_needs_int64(x2d, weight, r3, t3, g, dr3, mask),
        **tile,
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
    scale: LossScale,
    fold_scale: bool,
    n_rows: int,
    inner: int,
    dx3: torch.Tensor | None,
    dr3: torch.Tensor | None,
) -> torch.Tensor:
    """Run kernel (b); returns the float32 loss partials (already scaled; to be summed)."""
    d = x3.shape[-1]
    block_m, block_d = eltwise_blocks(n_rows, d)
    grid = (triton.cdiv(n_rows, block_m), triton.cdiv(d, block_d))
    loss_part = torch.empty(grid, dtype=torch.float32, device=x3.device)  # every slot written
    count, scale_value = scale.kernel_args()
    _eltwise_mse_kernel[grid](
        x3, r3, t3, mask, count,
        dx3, dr3, loss_part,
        n_rows, inner, d,
        *_strides3(x3), *_strides3(r3), *_strides3(t3), *_strides3(dx3), *_strides3(dr3),
        scale_value,
        HAS_RES=r3 is not None, HAS_MASK=mask is not None, HAS_COUNT=count is not None,
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
    dims = zip(t.stride(), t.shape, strict=True)
    for stride, size in sorted((st, sz) for st, sz in dims if sz > 1):
        if stride != expected:
            return False
        expected *= size
    return True


def finish_grads(
    grads: list[tuple[torch.Tensor, torch.dtype] | None],
    grad_output: torch.Tensor,
    scale: LossScale,
) -> list[torch.Tensor | None]:
    """Each ``buf * grad_output * scale`` in float32, rounded once to its dtype; one launch.

    ``grads`` holds up to 4 (buffer, dtype) pairs (None entries pass through as None). A buffer
    that already has its dtype is scaled in place (skipped on the device when the factor is 1);
    a float32 buffer of a 16-bit gradient is rounded into a new tensor of the same layout.
    """
    slots = []  # (index in grads, flat source, flat destination, in place)
    out: list[torch.Tensor | None] = [None] * len(grads)
    for i, item in enumerate(grads):
        if item is None:
            continue
        buf, dtype = item
        in_place = buf.dtype == dtype
        out[i] = buf if in_place else torch.empty_like(buf, dtype=dtype)
        n = buf.numel()
        if n == 0:
            continue
        if not _is_dense(buf) or out[i].stride() != buf.stride():
            raise ValueError("finish_grads needs dense buffers (no gaps, no overlaps)")
        # A dense tensor of any strides is numel elements from data_ptr, in the same order for
        # out[i] (same strides).
        slots.append((buf.as_strided((n,), (1,)), out[i].as_strided((n,), (1,)), in_place))
    if not slots:
        return out
    if len(slots) > 4:
        raise ValueError(f"finish_grads takes at most 4 gradients, got {len(slots)}")

    ends, total = [], 0  # slot i owns programs [ends[i-1], ends[i])
    for src, _, _ in slots:
        total += triton.cdiv(src.numel(), _SCALE_BLOCK)
        ends.append(total)
    padded = slots + [(None, None, True)] * (4 - len(slots))  # unused slots are not compiled
    count, scale_value = scale.kernel_args()
    _finish_grads_kernel[(total,)](
        *(arg for src, dst, _ in padded
          for arg in (src, dst, src.numel() if src is not None else 0)),
        *(ends + [total] * 3)[:3],
        grad_output.reshape(1), count, scale_value,
        N_GRADS=len(slots),
        IN_PLACE0=padded[0][2], IN_PLACE1=padded[1][2], IN_PLACE2=padded[2][2],
        IN_PLACE3=padded[3][2],
        HAS_COUNT=count is not None, BLOCK=_SCALE_BLOCK,
    )
    return out
