"""Fused imitation loss (gwtn_dist.kernels) against its PyTorch reference.

Ground truth is the reference evaluated in float64 on the *same* (already rounded) inputs, so the
tolerances below measure only the fused path's own rounding:

* loss: the fused kernel forms y in float32 registers and sums in float32, so the loss is tight
  for every dtype;
* gradients: g = dloss/dy is stored in the input dtype (for float16 without a mean's 1/count,
  which would underflow) and dx / d_residual are rounded to it (float16's are kept in float32),
  then rounded again after the scaling by grad_output in backward, so 16-bit gradients carry
  about two roundings of that dtype.

Where the Triton kernels run
----------------------------
On CUDA they run natively. Without CUDA they can only run in Triton's CPU interpreter, which
triton selects when it is first imported (its standard-library helpers such as tl.sum are
@triton.jit functions decorated then). torch imports triton lazily, e.g. on an optimizer step, so
``tests/conftest.py`` sets ``TRITON_INTERPRET=1`` for the whole session before any test runs. The
module fixture ``triton_kernels`` then makes sure our kernel module was built in that mode
(reloading it if not) and skips with the reason where the kernels cannot run.
"""

from __future__ import annotations

import contextlib
import csv
import importlib
import importlib.util
import os
import re
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch
from gwtn_dist.kernels import (
    ImitationMSE,
    imitation_mse,
    imitation_mse_reference,
    select_imitation_mse,
)
from gwtn_dist.kernels.imitation import availability

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
KERNEL_MODULE = "gwtn_dist.kernels.imitation.kernel"
# Not tests.conftest's REPO: the GPU check runs this file without the conftest (--noconftest),
# whose data fixtures need modules a GPU machine may lack.
REPO = Path(__file__).resolve().parents[1]

# (loss rtol, gradient rtol); gradient atol is the same fraction of the largest |gradient|.
TOL = {torch.float32: (1e-5, 1e-4), torch.bfloat16: (1e-4, 2e-2), torch.float16: (1e-4, 4e-3)}


@pytest.fixture(scope="module")
def triton_kernels():
    """Make the Triton kernels runnable here (natively on CUDA, else interpreted) or skip."""
    saved = os.environ.get("TRITON_INTERPRET")
    if not CUDA:
        os.environ["TRITON_INTERPRET"] = "1"
    try:
        compiled_before = KERNEL_MODULE in sys.modules and not CUDA
        if compiled_before and availability.triton_unavailable_reason(DEVICE) is not None:
            importlib.reload(sys.modules[KERNEL_MODULE])  # imported in compiled mode: rebuild
        reason = availability.triton_unavailable_reason(DEVICE)
        if reason is not None:
            pytest.skip(reason)
        importlib.import_module(KERNEL_MODULE)
        yield
    finally:
        if saved is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = saved


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------

GRAD_NAMES = ("x", "weight", "bias", "residual")


def make_inputs(x_shape, d_out, *, weight=True, bias=True, residual=True, mask=None, seed=0):
    """float32 CPU inputs for y = x W^T + b + r with y ~ N(0, 1), target ~ N(0, 1)."""
    g = torch.Generator().manual_seed(seed)
    fdim = 1 if len(x_shape) == 4 else len(x_shape) - 1
    d_in = x_shape[fdim]
    y_shape = list(x_shape)
    y_shape[fdim] = d_out if weight else d_in
    lead = [s for i, s in enumerate(x_shape) if i != fdim]
    out = {
        "x": torch.randn(x_shape, generator=g),
        "target": torch.randn(y_shape, generator=g),
        "weight": torch.randn(d_out, d_in, generator=g) / d_in**0.5 if weight else None,
        "bias": torch.randn(d_out, generator=g) if (weight and bias) else None,
        "residual": torch.randn(y_shape, generator=g) if residual else None,
        "mask": None,
    }
    if mask == "random":
        out["mask"] = torch.rand(lead, generator=g) > 0.3
    elif mask == "none_counted":
        out["mask"] = torch.zeros(lead, dtype=torch.bool)
    return out


def run(fn, inputs, *, dtype, device, reduction="mean", layout=None, requires=GRAD_NAMES,
        loss_factor=None, forward_context=contextlib.nullcontext):
    """Loss and leaf gradients of ``fn`` on ``inputs`` cast to dtype (layout applied to leaves).

    The forward runs inside ``forward_context()``, the backward outside it.
    """
    leaves = {}
    for name in ("x", "target", "weight", "bias", "residual"):
        t = inputs[name]
        if t is None:
            leaves[name] = None
            continue
        t = t.to(device=device, dtype=dtype)
        if layout is not None:
            t = layout(name, t)
        if name in requires:
            t = t.detach().requires_grad_()
        leaves[name] = t
    mask = inputs["mask"].to(device) if inputs["mask"] is not None else None
    with forward_context():
        loss = fn(leaves["x"], leaves["target"], leaves["weight"], leaves["bias"],
                  leaves["residual"], reduction=reduction, mask=mask)
    grads = {}
    if any(leaves[n] is not None and leaves[n].requires_grad for n in GRAD_NAMES):
        (loss * loss_factor if loss_factor is not None else loss).backward()
        grads = {n: leaves[n].grad for n in GRAD_NAMES if leaves[n] is not None and n in requires}
    return loss.detach(), grads


def ground_truth(inputs, *, dtype, reduction="mean", requires=GRAD_NAMES, loss_factor=None):
    """The reference in float64 on inputs rounded to ``dtype`` exactly as the fused path sees
    them."""
    rounded = {k: (v.to(dtype).double() if v is not None and k != "mask" else v)
               for k, v in inputs.items()}
    return run(imitation_mse_reference, rounded, dtype=torch.float64, device="cpu",
               reduction=reduction, requires=requires, loss_factor=loss_factor)


def assert_matches(fused, truth, dtype):
    (loss, grads), (loss_ref, grads_ref) = fused, truth
    loss_rtol, grad_rtol = TOL[dtype]
    assert loss.dtype == torch.float32 and loss.dim() == 0
    torch.testing.assert_close(loss.double().cpu(), loss_ref, rtol=loss_rtol, atol=1e-7)
    assert grads.keys() == grads_ref.keys()
    for name, ref in grads_ref.items():
        got = grads[name]
        assert got is not None, name
        assert got.dtype == dtype and got.shape == ref.shape, name
        atol = grad_rtol * float(ref.abs().max()) + 1e-12
        torch.testing.assert_close(got.double().cpu(), ref, rtol=grad_rtol, atol=atol,
                                   msg=lambda m, name=name: f"grad of {name}: {m}")


def check(inputs, dtype, **kw):
    reduction = kw.get("reduction", "mean")
    requires = kw.get("requires", GRAD_NAMES)
    fused = run(imitation_mse, inputs, dtype=dtype, device=DEVICE, **kw)
    truth = ground_truth(inputs, dtype=dtype, reduction=reduction, requires=requires,
                         loss_factor=kw.get("loss_factor"))
    assert_matches(fused, truth, dtype)
    return fused, truth


# ---------------------------------------------------------------------------------------------
# fused linear kernel (weight given)
# ---------------------------------------------------------------------------------------------

LINEAR_CASES = {
    # id: (x shape, D_out, options)
    "N1": ((1, 40), 48, {}),
    "N3-tiny": ((3, 17), 5, {"residual": False}),
    "N127-evenK-mask": ((127, 64), 32, {"mask": "random", "residual": False}),
    "N1000-mask": ((1000, 40), 72, {"mask": "random"}),
    "3d-mask": ((3, 37, 24), 40, {"mask": "random"}),
    "4d-nobias": ((2, 24, 5, 7), 20, {"bias": False, "mask": "random"}),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", list(LINEAR_CASES), ids=str)
def test_linear_matches_reference(triton_kernels, case, dtype):
    x_shape, d_out, opts = LINEAR_CASES[case]
    (_, grads), _ = check(make_inputs(x_shape, d_out, **opts), dtype)
    if opts.get("mask") == "random":  # rows that do not count get exactly zero gradient
        inputs = make_inputs(x_shape, d_out, **opts)
        dropped = ~inputs["mask"].to(DEVICE)
        x_grad = grads["x"].movedim(1, -1) if len(x_shape) == 4 else grads["x"]
        assert dropped.any() and (x_grad[dropped] == 0).all()


def _channels_last(name, t):
    return t.contiguous(memory_format=torch.channels_last) if t.dim() == 4 else t


def _strided(name, t):
    """Non-contiguous leaves with the same values: sliced features, transposed matrices."""
    if name == "weight":
        return t.t().contiguous().t()  # column-major (D_out, D_in)
    if name == "bias":
        return torch.zeros(t.shape[0], 3, dtype=t.dtype, device=t.device)[:, 1].copy_(t)
    big = torch.zeros(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype, device=t.device)
    return big[..., ::2].copy_(t)  # feature stride 2


def _expanded_residual(name, t):
    # A broadcast residual (row stride 0) is read in place; its gradient is per element.
    return t[:1].expand_as(t) if name == "residual" else t


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize(
    "layout,x_shape",
    [
        (_channels_last, (2, 24, 5, 7)),
        (_strided, (50, 24)),
        (_strided, (2, 9, 24)),
        (_expanded_residual, (30, 24)),
    ],
    ids=["channels_last", "strided-2d", "strided-3d", "expanded-residual"],
)
def test_linear_layouts(triton_kernels, layout, x_shape, dtype):
    inputs = make_inputs(x_shape, 40, mask="random")
    if layout is _expanded_residual:
        inputs["residual"][1:] = inputs["residual"][:1]  # ground truth sees the same values
    check(inputs, dtype, layout=layout)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_linear_multi_chunk(triton_kernels, monkeypatch, dtype):
    """Several row chunks (unaligned starts, fp32 dW accumulation) give the one-chunk result."""
    from gwtn_dist.kernels.imitation import fused

    monkeypatch.setattr(fused, "CHUNK_ELEMENTS", 37 * 48)  # 37-row chunks of D_out = 48
    assert fused.chunk_rows(300, 48) == 37
    check(make_inputs((300, 40), 48, mask="random"), dtype)


def test_reduction_sum_and_grad_output_scaling(triton_kernels):
    inputs = make_inputs((90, 24), 40, mask="random")
    (loss_sum, grads_sum), _ = check(inputs, torch.float32, reduction="sum", loss_factor=3.5)
    (loss_mean, grads_mean), _ = check(inputs, torch.float32, loss_factor=3.5)
    count = int(inputs["mask"].sum()) * 40
    torch.testing.assert_close(loss_sum / count, loss_mean)
    torch.testing.assert_close(grads_sum["weight"] / count, grads_mean["weight"])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("weight", [True, False], ids=["linear", "eltwise"])
@pytest.mark.parametrize(
    "mask,reduction", [(None, "mean"), ("random", "mean"), (None, "sum")],
    ids=["mean", "mask-mean", "sum"],
)
def test_grad_output_scaling_odd_shapes(triton_kernels, mask, reduction, weight, dtype):
    """grad_output != 1 on odd sizes (no dim a multiple of a tile): float16 scales by
    scale * grad_output in backward, float32 / bfloat16 by grad_output only; d_weight and d_bias
    are rounded from float32 there. All four gradients go through the one backward launch."""
    inputs = make_inputs((3, 13, 21), 19 if weight else 0, weight=weight, mask=mask, seed=5)
    check(inputs, dtype, reduction=reduction, loss_factor=3.0)


@pytest.mark.parametrize("mask", [None, "random"], ids=["nomask", "mask"])
@pytest.mark.parametrize("weight", [False, True], ids=["eltwise", "linear"])
def test_fp16_mean_with_loss_scaling(triton_kernels, weight, mask):
    """float16, mean over 48k elements, grad_output = 2**16 (a GradScaler's loss scale).

    With |y - t| ~ 1e-3 the gradient 2 (y - t) / count * 65536 is ~3e-3, well inside float16,
    but 2 (y - t) / count alone (~4e-8) is below float16's smallest subnormal (6e-8): gradients
    must be multiplied by grad_output before they are rounded to float16, not after.
    """
    d_out = 40 if weight else 48
    inputs = make_inputs((1000, 48), d_out, weight=weight, mask=mask, seed=3)
    y = inputs["x"] @ inputs["weight"].T + inputs["bias"] if weight else inputs["x"].clone()
    y += inputs["residual"]
    noise = torch.randn(y.shape, generator=torch.Generator().manual_seed(4))
    inputs["target"] = y + 1e-3 * noise  # (1000, d_out): y - t ~ 1e-3 (after rounding, too)
    check(inputs, torch.float16, loss_factor=65536.0)


class _CountingLaunches:
    """Stands in for a @triton.jit / autotuned kernel object; counts ``kernel[grid](...)``,
    through the autotuner or (pinned tiles) its ``.fn``, and keeps each launch's arguments by
    name."""

    def __init__(self, kernel, owner=None):
        self.kernel, self.owner = kernel, owner or self
        self.launches, self.calls = 0, []

    def __getitem__(self, grid):
        self.owner.launches += 1
        launch = self.kernel[grid]

        def call(*args, **kwargs):
            names = getattr(self.kernel, "arg_names", None) or []
            self.owner.calls.append({**dict(zip(names, args, strict=False)), **kwargs})
            return launch(*args, **kwargs)
        return call

    @property
    def fn(self):
        return _CountingLaunches(self.kernel.fn, owner=self.owner)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_one_kernel_launch_per_chunk_and_backward(triton_kernels, monkeypatch, dtype):
    """Forward: one kernel per row chunk (the masked count is a torch sum read on the device);
    backward: one kernel for all four gradients, whatever grad_output is."""
    from gwtn_dist.kernels.imitation import fused
    from gwtn_dist.kernels.imitation import kernel as K

    counters = {}
    for name in ("_linear_mse_kernel", "_eltwise_mse_kernel", "_finish_grads_kernel"):
        counters[name] = _CountingLaunches(getattr(K, name))
        monkeypatch.setattr(K, name, counters[name])
    monkeypatch.setattr(fused, "CHUNK_ELEMENTS", 37 * 40)  # 37-row chunks of D_out = 40
    inputs = make_inputs((90, 24), 40, mask="random")  # 3 chunks
    check(inputs, dtype)
    assert {k: c.launches for k, c in counters.items()} == {
        "_linear_mse_kernel": 3, "_eltwise_mse_kernel": 0, "_finish_grads_kernel": 1}


@pytest.mark.parametrize("pinned", [False, True], ids=["autotuned", "pinned"])
def test_tuned_arguments_are_tensors_and_the_key_has_the_rows(triton_kernels, monkeypatch,
                                                              pinned):
    """Every argument the autotuner zeroes is a tensor on every path (no bias gradient, no grad
    at all), as triton releases that zero without a None check need; the tuning key holds the
    chunk's rows, bucketed, the same for a call's shorter last chunk; GWTN_PIN_TILES=1 launches
    the fixed tile without the autotuner."""
    from gwtn_dist.kernels.imitation import fused
    from gwtn_dist.kernels.imitation import kernel as K

    monkeypatch.setenv(K.PIN_TILES_ENV, "1" if pinned else "0")
    assert K.pinned_tiles() is pinned
    assert "M_BUCKET" in K._linear_mse_kernel.keys
    assert [K.rows_bucket(n) for n in (1, 128, 129, 1000, 70000)] == [128, 128, 256, 1024, 131072]
    counter = _CountingLaunches(K._linear_mse_kernel)
    monkeypatch.setattr(K, "_linear_mse_kernel", counter)
    monkeypatch.setattr(fused, "CHUNK_ELEMENTS", 260 * 40)  # chunks of 256 rows: 256 + 44
    inputs = make_inputs((300, 24), 40, bias=False, mask="random")
    check(inputs, torch.float16)  # gradients wanted, none for a bias
    x, t, w = (inputs[k].to(DEVICE) for k in ("x", "target", "weight"))
    with torch.no_grad():  # the loss alone
        imitation_mse(x, t, w.requires_grad_())
    assert counter.launches == len(counter.calls) == 4
    for args in counter.calls:
        for name in K._linear_mse_kernel.kernel.reset_to_zero:
            assert torch.is_tensor(args[name]), name
        assert args["M_BUCKET"] == 256  # the chunk's 256 rows, for the 44-row chunk too
        assert ("BLOCK_M" in args) is pinned  # the fixed tile is given to the kernel itself
    if pinned:
        assert (counter.calls[0]["BLOCK_M"], counter.calls[0]["BLOCK_N"]) == K.pinned_tile(2)[:2]


def test_pinned_tiles_under_several_ranks(tmp_path):
    """Two real processes (gloo): each pins the tile instead of tuning on its own timings, and
    both compute the same loss bits (here from the same inputs)."""
    script = tmp_path / "rank.py"
    script.write_text(textwrap.dedent(f"""
        import os, sys
        os.environ["TRITON_INTERPRET"] = "{'0' if CUDA else '1'}"
        sys.path.insert(0, {str(REPO)!r})
        from benchmarks.checkout import use_checkout
        use_checkout()
        import torch, torch.distributed as dist
        from gwtn_dist.kernels import imitation_mse
        from gwtn_dist.kernels.imitation import kernel as K
        os.environ.pop(K.PIN_TILES_ENV, None)
        assert not K.pinned_tiles()
        dist.init_process_group("gloo")
        assert K.pinned_tiles(), "several ranks must pin the tile"
        dev = "{DEVICE.type}"
        g = torch.Generator().manual_seed(0)
        x, t, w = (torch.randn(*s, generator=g).to(dev) for s in ((70, 24), (70, 40), (40, 24)))
        loss = imitation_mse(x, t, w.requires_grad_())
        loss.backward()
        out = torch.tensor([loss.item(), float(w.grad.double().abs().sum())], dtype=torch.float64)
        got = [torch.zeros(2, dtype=torch.float64) for _ in range(2)]
        dist.all_gather(got, out)
        assert torch.equal(got[0], got[1]), got
        dist.destroy_process_group()
        print("ok", float(out[0]))
    """))
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(29500 + os.getpid() % 500),
           "WORLD_SIZE": "2"}
    procs = [subprocess.Popen([sys.executable, str(script)], env={**env, "RANK": str(r)},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for r in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (out, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err[-3000:]
        assert out.startswith("ok"), out


def _scaled_truth(inputs, loss_scale):
    """float64 gradients of loss * loss_scale on the float16-rounded inputs."""
    return ground_truth(inputs, dtype=torch.float16, loss_factor=loss_scale)


@pytest.mark.parametrize("weight", [True, False], ids=["linear", "eltwise"])
@pytest.mark.parametrize("loss_scale", [2.0**16, 2.0**24], ids=["2^16", "2^24"])
def test_fp16_gradients_finite_under_loss_scaling(triton_kernels, weight, loss_scale):
    """float16 with a GradScaler's loss scale as grad_output: every gradient whose scaled value
    fits float16 comes back finite and right.

    2^16: a mean over 128k elements (more than the scale), so each scaled gradient is half its
    sum-reduction size; that size (|dx| about 96k, |d_residual| 80k) exceeds float16's 65504, and
    an inf kept there would stay inf at every scale a GradScaler tried. 2^24: small differences
    (|y - t| ~ 1e-2 over 48k elements), whose unscaled mean gradient (4e-7) float16 would hold in
    a few subnormal bits only: the scale must come in before the one rounding to float16."""
    g = torch.Generator().manual_seed(11)
    if loss_scale == 2.0**16:
        rows, d_in, d_out = (2048, 16, 64) if weight else (4096, 32, 32)
        x = torch.randn(rows, d_in, generator=g)
        w = torch.full((d_out, d_in), 1.5) if weight else None
        y = x @ w.T if weight else x * 100
        r = torch.zeros(rows, d_out)
        t = y - (500.0 if weight else 40000.0)  # |2 (y - t) W| summed over D_out: 96000
        if not weight:
            x = x * 100  # y = x (±400), target 40000 below: |2 (y - t)| = 80000
    else:
        rows, d_in, d_out = (1200, 40, 40)
        x = torch.randn(rows, d_in, generator=g)
        w = torch.randn(d_out, d_in, generator=g) / d_in**0.5 if weight else None
        y = x @ w.T if weight else x.clone()
        r = torch.randn(rows, d_out, generator=g)
        t = y + r + 1e-2 * torch.randn(rows, d_out, generator=g)
    inputs = {"x": x, "target": t, "weight": w, "bias": None, "residual": r, "mask": None}
    _, grads = run(imitation_mse, inputs, dtype=torch.float16, device=DEVICE,
                   loss_factor=loss_scale)
    _, truth = _scaled_truth(inputs, loss_scale)
    for name, ref in truth.items():
        assert ref.abs().max() < 65504, name  # the scaled gradient fits float16 ...
        got = grads[name]
        assert got.dtype == torch.float16 and torch.isfinite(got).all(), name  # ... so must ours
        torch.testing.assert_close(got.double().cpu(), ref, rtol=4e-3,
                                   atol=4e-3 * float(ref.abs().max()),
                                   msg=lambda m, name=name: f"grad of {name}: {m}")


def test_failed_float32_gemm_warns_once_and_is_recorded(triton_kernels, monkeypatch):
    """A device that should take torch.mm(..., out_dtype=float32) and refuses: a warning, once,
    kept in ``notes()`` for stage.json, and the same gradients from float32 operands."""
    from gwtn_dist.kernels.imitation import fused, notes

    monkeypatch.setattr(fused, "_MM_OUT_DTYPE_OK", {DEVICE.type: True})
    monkeypatch.setattr(notes, "_NOTES", [])
    real_mm = torch.mm

    def refusing_mm(*args, **kwargs):
        if "out_dtype" in kwargs:
            raise NotImplementedError("aten::mm.dtype is not here")
        return real_mm(*args, **kwargs)

    monkeypatch.setattr(torch, "mm", refusing_mm)
    inputs = make_inputs((90, 24), 40)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        for _ in range(2):
            check(inputs, torch.bfloat16)
    said = [w for w in seen if re.search("out_dtype=float32.*failed", str(w.message))]
    assert len(said) == 1 and said[0].category is RuntimeWarning
    assert len(notes.notes()) == 1 and "aten::mm.dtype is not here" in notes.notes()[0]


def test_reference_accumulates_16bit_in_float32():
    """The eager reference forms y + residual - target in float32 for 16-bit x, as the fused
    kernel does: an elementwise bf16 loss whose differences bfloat16 could not hold exactly
    matches float64 to float32 rounding."""
    inputs = make_inputs((64, 48), 0, weight=False, mask="random", seed=9)
    inputs["target"] = inputs["x"] + inputs["residual"] - 1e-3 * inputs["target"]  # tiny diffs
    loss, _ = run(imitation_mse_reference, inputs, dtype=torch.bfloat16, device="cpu")
    truth, _ = ground_truth(inputs, dtype=torch.bfloat16)
    torch.testing.assert_close(loss.double(), truth, rtol=1e-5, atol=0)


def test_partial_requires_grad(triton_kernels):
    """Only what requires grad gets a gradient (e.g. a frozen student, trainable lift)."""
    inputs = make_inputs((64, 24), 40)
    for requires in [("weight",), ("bias",), ("residual",), ("x", "residual")]:
        (_, grads), _ = check(inputs, torch.float32, requires=requires)
        assert set(grads) == set(requires)


def test_no_grad_path_matches(triton_kernels):
    """Under no_grad (evaluation) the loss is the same and no graph is built."""
    inputs = make_inputs((64, 24), 40, mask="random")
    x, t, w, b, r = (inputs[k].to(DEVICE, torch.bfloat16)
                     for k in ("x", "target", "weight", "bias", "residual"))
    w.requires_grad_()
    with torch.no_grad():
        loss = imitation_mse(x, t, w, b, r, mask=inputs["mask"].to(DEVICE))
    assert loss.grad_fn is None and not loss.requires_grad
    loss_ref, _ = ground_truth(inputs, dtype=torch.bfloat16, requires=())
    torch.testing.assert_close(loss.double().cpu(), loss_ref, rtol=1e-4, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("weight", [True, False], ids=["linear", "eltwise"])
def test_all_false_mask_gives_zero(triton_kernels, weight, dtype):
    """Documented choice: nothing counted -> loss 0 (not NaN) and all gradients 0 (float16 too,
    where backward applies the scale: a count of 0 on the device gives scale 0)."""
    inputs = make_inputs((2, 8, 24), 40, weight=weight, mask="none_counted")
    inputs["target"][0, 0, 0] = float("nan")  # ignored rows cannot leak NaN either
    for fn in (imitation_mse, imitation_mse_reference):
        device = DEVICE if fn is imitation_mse else "cpu"
        loss, grads = run(fn, inputs, dtype=dtype, device=device)
        assert loss.item() == 0.0
        assert grads and all((g == 0).all() for g in grads.values())


def test_empty_input(triton_kernels):
    """No rows at all: loss 0 and zero gradients, like an all-False mask."""
    inputs = make_inputs((0, 24), 40)
    for fn, device in ((imitation_mse, DEVICE), (imitation_mse_reference, "cpu")):
        loss, grads = run(fn, inputs, dtype=torch.float32, device=device)
        assert loss.item() == 0.0
        assert grads["weight"].shape == (40, 24) and (grads["weight"] == 0).all()


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_autocast_is_ignored(triton_kernels, backend):
    """A forward inside autocast: both backends compute (and return gradients) in x's dtype."""
    fn = select_imitation_mse(backend, DEVICE)
    inputs = make_inputs((50, 24), 40, mask="random")
    # Backward outside the region, as torch.autocast's documentation asks.
    got = run(fn, inputs, dtype=torch.float32, device=DEVICE,
              forward_context=lambda: torch.autocast(DEVICE.type, dtype=torch.bfloat16))
    assert_matches(got, ground_truth(inputs, dtype=torch.float32), torch.float32)


def test_second_backward_raises(triton_kernels):
    inputs = make_inputs((16, 24), 40)
    x = inputs["x"].to(DEVICE).requires_grad_()
    loss = imitation_mse(x, inputs["target"].to(DEVICE), inputs["weight"].to(DEVICE))
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="retain_graph"):
        loss.backward()


F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16
MIXED_CASES = {
    # id: (x shape, D_out (None: no weight), dtype of each leaf, mask)
    "bf16-x-fp32-conv-lift": (
        (2, 24, 4, 3), 40, {"x": BF16, "weight": F32, "bias": F32, "residual": F32, "target": F32},
        None),
    "fp32-x-bf16-lift": (
        (3, 7, 24), 40, {"x": F32, "weight": BF16, "bias": BF16, "residual": BF16, "target": BF16},
        "random"),
    "fp16-x-fp32-residual-eltwise": (
        (37, 24), None, {"x": F16, "residual": F32, "target": F32}, "random"),
}


@pytest.mark.parametrize("backend", ["triton", "reference"])
@pytest.mark.parametrize("case", list(MIXED_CASES), ids=str)
def test_mixed_dtypes_same_rule_in_both_backends(triton_kernels, backend, case):
    """weight, bias and residual are cast to x's dtype (differentiably, so each gradient has its
    leaf's dtype); target is read in its own dtype. Both backends, against float64 on the values
    the computation sees."""
    x_shape, d_out, dtypes, mask = MIXED_CASES[case]
    inputs = make_inputs(x_shape, d_out or 0, weight=d_out is not None, mask=mask)
    conv_lift = d_out is not None and len(x_shape) == 4
    names = [n for n in dtypes if n != "target"]
    leaves = {n: inputs[n].to(DEVICE, dtypes[n]) for n in dtypes}
    if conv_lift:
        leaves["weight"] = leaves["weight"][:, :, None, None]  # (C_out, C_in, 1, 1)
    for n in names:
        leaves[n].requires_grad_()
    mask_t = inputs["mask"].to(DEVICE) if inputs["mask"] is not None else None
    loss = select_imitation_mse(backend, DEVICE)(**leaves, mask=mask_t)
    loss.backward()

    compute = dtypes["x"]  # leaves rounded to their dtype, then to x's; target to its own only
    seen = {n: inputs[n].to(dtypes[n]).to(compute if n != "target" else dtypes[n]).double()
            for n in dtypes}
    truth_loss, truth = run(imitation_mse_reference, {**inputs, **seen}, dtype=torch.float64,
                            device="cpu", requires=names)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    # The eager reference rounds y and y - t to 16-bit x's dtype, the fused path does not.
    eager_16bit = backend == "reference" and compute != F32
    loss_rtol = 1e-2 if eager_16bit else TOL[compute][0]
    torch.testing.assert_close(loss.double().cpu(), truth_loss, rtol=loss_rtol, atol=1e-7)
    for n in names:
        got = leaves[n].grad
        assert got.dtype == dtypes[n] and got.shape == leaves[n].shape, n
        if conv_lift and n == "weight":
            got = got[:, :, 0, 0]
        rtol = max(TOL[compute][1], TOL[dtypes[n]][1], 3e-2 if eager_16bit else 0.0)
        ref = truth[n]
        torch.testing.assert_close(got.double().cpu(), ref, rtol=rtol,
                                   atol=rtol * float(ref.abs().max()),
                                   msg=lambda m, n=n: f"grad of {n}: {m}")


# ---------------------------------------------------------------------------------------------
# fused elementwise kernel (no weight)
# ---------------------------------------------------------------------------------------------

ELTWISE_CASES = {
    "N1": ((1, 40), {}),
    "N1000-mask": ((1000, 40), {"mask": "random"}),
    "3d-mask-nores": ((3, 37, 24), {"mask": "random", "residual": False}),
    "4d-mask": ((2, 24, 5, 7), {"mask": "random"}),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", list(ELTWISE_CASES), ids=str)
def test_eltwise_matches_reference(triton_kernels, case, dtype):
    x_shape, opts = ELTWISE_CASES[case]
    (_, grads), _ = check(make_inputs(x_shape, 0, weight=False, **opts), dtype)
    if "residual" in grads:  # y = x + r: both receive the same gradient
        assert torch.equal(grads["x"], grads["residual"])


@pytest.mark.parametrize("layout", [_channels_last, _strided], ids=["channels_last", "strided"])
def test_eltwise_layouts(triton_kernels, layout):
    x_shape = (2, 24, 5, 7) if layout is _channels_last else (2, 9, 24)
    check(make_inputs(x_shape, 0, weight=False, mask="random"), torch.bfloat16, layout=layout)


# ---------------------------------------------------------------------------------------------
# training-pipeline call, module, backend selection, argument errors
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["auto", "triton", "reference"])
def test_pipeline_call_4d(triton_kernels, backend):
    """select_imitation_mse(cfg, device)(student, teacher, weight=..., bias=...) on conv maps."""
    inputs = make_inputs((2, 16, 6, 5), 24, residual=False)
    fn = select_imitation_mse(backend, DEVICE)
    expected = imitation_mse if backend == "triton" or (backend == "auto" and CUDA) else (
        imitation_mse_reference)
    assert fn is expected
    x = inputs["x"].to(DEVICE, torch.bfloat16).requires_grad_()
    w = inputs["weight"].to(DEVICE, torch.bfloat16).requires_grad_()
    b = inputs["bias"].to(DEVICE, torch.bfloat16).requires_grad_()
    loss = fn(x, inputs["target"].to(DEVICE, torch.bfloat16), weight=w, bias=b)
    loss.backward()
    truth_loss, truth = ground_truth({**inputs, "residual": None}, dtype=torch.bfloat16)
    # The eager bf16 reference rounds y and y - t to bfloat16, hence the looser loss bound.
    torch.testing.assert_close(loss.double().cpu(), truth_loss, rtol=1e-2, atol=0)
    for name, t in (("x", x), ("weight", w), ("bias", b)):
        ref = truth[name]
        torch.testing.assert_close(t.grad.double().cpu(), ref, rtol=3e-2,
                                   atol=3e-2 * float(ref.abs().max()))


def test_module_wrapper(triton_kernels):
    inputs = make_inputs((40, 24), 32, mask="random")
    module = ImitationMSE(reduction="sum", backend="triton")
    assert "sum" in repr(module) and "triton" in repr(module)
    fused = run(lambda *a, reduction, mask: module(*a, mask=mask), inputs,
                dtype=torch.float32, device=DEVICE)
    assert_matches(fused, ground_truth(inputs, dtype=torch.float32, reduction="sum"),
                   torch.float32)
    with pytest.raises(ValueError, match="allowed"):
        ImitationMSE(backend="cudnn")


def test_select_backend_errors(monkeypatch):
    with pytest.raises(ValueError, match="auto, triton, reference"):
        select_imitation_mse("fast", "cpu")
    assert select_imitation_mse("reference", "cpu") is imitation_mse_reference
    assert select_imitation_mse("auto", "cpu") is imitation_mse_reference
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # auto never picks the interpreter
    assert select_imitation_mse("auto", "cpu") is imitation_mse_reference
    monkeypatch.delenv("TRITON_INTERPRET")
    expected = "TRITON_INTERPRET=1" if importlib.util.find_spec("triton") else "not installed"
    with pytest.raises(RuntimeError, match=expected):
        select_imitation_mse("triton", "cpu")
    with pytest.raises(RuntimeError, match=expected):
        imitation_mse(torch.randn(4, 8), torch.randn(4, 8))


def test_argument_errors():
    x, t, w = torch.randn(6, 8), torch.randn(6, 4), torch.randn(4, 8)
    bad = [
        ({"target": torch.randn(6, 5), "weight": w}, "target must have"),
        ({"target": t, "weight": w, "mask": torch.ones(6, 1, dtype=torch.bool)}, "mask must have"),
        ({"target": t, "weight": w, "mask": torch.ones(6)}, "bool"),
        ({"target": t, "weight": w, "reduction": "max"}, "reduction"),
        ({"target": t, "weight": torch.randn(4, 7)}, "weight must be"),
        ({"target": torch.randn(6, 8), "bias": torch.randn(8)}, "without weight"),
        ({"target": t, "weight": w, "residual": torch.randn(6, 8)}, "residual must have"),
    ]
    for kwargs, message in bad:
        with pytest.raises(ValueError, match=message):
            imitation_mse_reference(x, **kwargs)
        with pytest.raises(ValueError, match=message):
            imitation_mse(x, **kwargs)  # checked before any device requirement


def test_import_without_triton(tmp_path):
    """The package imports and the reference runs when triton cannot be imported."""
    code = textwrap.dedent(
        """
        import sys
        sys.modules["triton"] = None  # makes `import triton` fail
        import torch
        from gwtn_dist.kernels import imitation_mse_reference, select_imitation_mse
        fn = select_imitation_mse("auto", "cpu")
        assert fn is imitation_mse_reference
        print(float(fn(torch.ones(2, 3), torch.zeros(2, 3))))
        try:
            select_imitation_mse("triton", "cpu")
        except RuntimeError as e:
            assert "not installed" in str(e), e
        else:
            raise AssertionError("expected RuntimeError")
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         cwd=tmp_path, timeout=120, check=False)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "1.0"


# ---------------------------------------------------------------------------------------------
# GPU-only (skipped without CUDA) and the benchmark's CPU smoke mode
# ---------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_realistic_shapes(triton_kernels, monkeypatch, dtype):
    """Autotuned GPU tiles on training-sized problems, several chunks included."""
    from gwtn_dist.kernels.imitation import fused

    check(make_inputs((4, 1000, 768), 1024, mask="random"), dtype)
    monkeypatch.setattr(fused, "CHUNK_ELEMENTS", 1024 * 1000)  # 896-row chunks
    check(make_inputs((3000, 512), 1024), dtype)
    check(make_inputs((8, 256, 32, 32), 256, weight=False, mask="random"), dtype)


def test_benchmark_quick_cpu(tmp_path):
    """The benchmark's --quick CPU mode runs and writes rows for the eager and floor providers."""
    from gwtn_dist.benchmarks import imitation_kernels as imitation_bench

    imitation_bench.main(["--quick", "--device", "cpu", "--no-compile", "--out", str(tmp_path)])
    with open(tmp_path / "imitation_bench.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    providers = {r["provider"] for r in rows}
    assert {"eager", "floor"} <= providers and "compile" not in providers
    assert {r["mode"] for r in rows} >= {"forward", "backward", "full"}
    assert all(float(r["ms"]) > 0 for r in rows if r["provider"] in ("eager", "floor"))
    assert (tmp_path / "imitation_bench.png").stat().st_size > 0
