"""Benchmark of the fused imitation loss against eager PyTorch, torch.compile and the matmul floor.

Run ``gwtn bench kernels [--out DIR]`` (or ``python -m gwtn_dist.benchmarks.imitation_kernels``,
or this file as a script). On CPU it runs small sizes with eager PyTorch and the matmul floor
only, and says that timings of the kernel need a GPU (see ``resolve``). Providers:

* ``fused``   - ``imitation_mse`` (Triton; CUDA only - on CPU Triton only interprets, so skipped);
* ``eager``   - ``imitation_mse_reference`` (plain PyTorch autograd);
* ``compile`` - ``torch.compile`` of the same eager code (``--no-compile`` skips it);
* ``floor``   - the three GEMMs alone: ``y = x W^T`` forward, ``dx = g W`` and ``dW = g^T x``
  backward; no loss, so no implementation can beat it by much.

Modes: ``forward`` (the fused provider already computes its gradients here), ``backward`` (the
forward runs untimed before each repetition) and ``full``. Time is the median of repetitions
(CUDA events on GPU), memory the peak allocated during one run minus what was allocated before
it (CUDA only; gradients left in ``.grad`` count). The ``elementwise`` sweep (no weight) reports
the bandwidth the loss achieves, counting one read of x and target and one write of dx, against
the GPU's peak where known. Results go to ``OUT/imitation_bench.csv`` and ``imitation_bench.png``.
"""

from __future__ import annotations

import argparse
import csv
import math
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch

from gwtn_dist.benchmarks.timing import (
    device_name,
    median_ms,
    peak_bandwidth_gbps,
    peak_extra_mb,
)
from gwtn_dist.kernels import imitation_mse, imitation_mse_reference

MODES = ("forward", "backward", "full")
PROVIDERS = ("fused", "eager", "compile", "floor")
DEFAULT_TOKENS = [1024, 2048, 4096, 8192, 16384, 32768, 65536]
DEFAULT_SHAPES = [(768, 768), (1024, 1024), (768, 3072), (512, 2048), (2048, 2048)]
DEFAULT_ELTWISE_WIDTHS = [768, 2048]
QUICK_TOKENS = [128, 256]
QUICK_SHAPES = [(64, 64), (32, 96)]
QUICK_ELTWISE_WIDTHS = [64]
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
CSV_FIELDS = ["device", "dtype", "sweep", "provider", "mode", "tokens", "d_in", "d_out", "ms",
              "peak_extra_mb", "gbps", "pct_peak_bw"]


@dataclass(frozen=True)
class Case:
    sweep: str  # "linear" (weight + bias) or "elementwise" (no weight)
    tokens: int
    d_in: int
    d_out: int
    dtype: torch.dtype
    device: torch.device


def make_inputs(case: Case) -> dict[str, torch.Tensor]:
    """Leaves x (N, D_in), weight (D_out, D_in), bias (D_out,) needing grad; target (N, D_out)."""
    kw = {"dtype": case.dtype, "device": case.device}
    out = {
        "x": torch.randn(case.tokens, case.d_in, **kw).requires_grad_(),
        "target": torch.randn(case.tokens, case.d_out, **kw),
    }
    if case.sweep == "linear":
        out["weight"] = (torch.randn(case.d_out, case.d_in, **kw) / case.d_in**0.5).requires_grad_()
        out["bias"] = torch.zeros(case.d_out, **kw).requires_grad_()
        out["g"] = torch.randn(case.tokens, case.d_out, **kw)  # stand-in dL/dy for the floor
    return out


def _clear_grads(inputs: dict[str, torch.Tensor]) -> None:
    for t in inputs.values():
        t.grad = None


def loss_runners(
    loss_fn: Callable[..., torch.Tensor], inputs: dict[str, torch.Tensor]
) -> dict[str, tuple[Callable, Callable]]:
    """(setup, timed fn) per mode for a loss function."""

    def loss():
        return loss_fn(inputs["x"], inputs["target"], inputs.get("weight"), inputs.get("bias"))

    def fresh():
        _clear_grads(inputs)

    def forward_done():
        _clear_grads(inputs)
        return loss()

    return {
        "forward": (fresh, lambda _: loss()),
        "backward": (forward_done, lambda out: out.backward()),
        "full": (fresh, lambda _: loss().backward()),
    }


def floor_runners(inputs: dict[str, torch.Tensor]) -> dict[str, tuple[Callable, Callable]]:
    """The GEMMs any implementation must do: y = x W^T; dx = g W; dW = g^T x."""
    x, w, g = inputs["x"].detach(), inputs["weight"].detach(), inputs["g"]

    def fwd(_):
        return torch.mm(x, w.t())

    def bwd(_):
        return torch.mm(g, w), torch.mm(g.t(), x)

    return {
        "forward": (None, fwd),
        "backward": (None, bwd),
        "full": (None, lambda _: (fwd(_), bwd(_))),
    }


def _compiled_reference() -> Callable[..., torch.Tensor]:
    # One compiled function reused for every shape; static shapes (what a fixed-shape training
    # step gets), so allow one recompilation per benchmarked shape instead of falling back.
    import torch._dynamo

    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, 256)
    return torch.compile(imitation_mse_reference, dynamic=False)


def run_case(case, providers, modes, reps, warmup, compiled, peak_bw) -> list[dict]:
    inputs = make_inputs(case)
    rows = []
    for provider in providers:
        if provider == "fused" and case.device.type != "cuda":
            continue  # Triton only interprets on CPU: not a meaningful timing
        if provider == "floor" and case.sweep != "linear":
            continue
        if provider == "floor":
            runners = floor_runners(inputs)
        else:
            fn = {"fused": imitation_mse, "eager": imitation_mse_reference,
                  "compile": compiled}[provider]
            runners = loss_runners(fn, inputs)
        for mode in modes:
            setup, fn = runners[mode]
            ms = median_ms(fn, case.device, setup=setup, reps=reps, warmup=warmup)
            mem = peak_extra_mb(fn, case.device, setup=setup)
            gbps = pct = math.nan
            if case.sweep == "elementwise" and mode == "full":
                moved = case.tokens * case.d_in * 3 * torch.finfo(case.dtype).bits // 8
                gbps = moved / (ms * 1e-3) / 1e9
                pct = 100 * gbps / peak_bw if peak_bw else math.nan
            rows.append({
                "device": device_name(case.device), "dtype": str(case.dtype).split(".")[-1],
                "sweep": case.sweep, "provider": provider, "mode": mode, "tokens": case.tokens,
                "d_in": case.d_in, "d_out": case.d_out, "ms": ms, "peak_extra_mb": mem,
                "gbps": gbps, "pct_peak_bw": pct,
            })
        _clear_grads(inputs)
    return rows


# ---------------------------------------------------------------------------------------------
# reporting
# ---------------------------------------------------------------------------------------------


def _fmt(v) -> str:
    if isinstance(v, float):
        return "-" if math.isnan(v) else f"{v:.4g}"
    return str(v)


def print_table(rows: list[dict]) -> None:
    cols = ["sweep", "provider", "mode", "tokens", "d_in", "d_out", "ms", "peak_extra_mb",
            "gbps", "pct_peak_bw"]
    cells = [[_fmt(r[c]) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    print("  ".join(c.rjust(w) for c, w in zip(cols, widths, strict=True)))
    for row in cells:
        print("  ".join(v.rjust(w) for v, w in zip(row, widths, strict=True)))


def print_summary(rows: list[dict]) -> None:
    """Fused vs the others in full mode (speed-ups > 1 favour fused; memory as a fraction)."""
    full = {(r["provider"], r["tokens"], r["d_in"], r["d_out"]): r
            for r in rows if r["sweep"] == "linear" and r["mode"] == "full"}
    keys = sorted({k[1:] for k in full if k[0] == "fused"})
    if not keys:
        return
    print("\nfull fwd+bwd, fused relative to:  eager x | compile x | floor ratio | mem vs eager")
    for key in keys:
        fused = full[("fused", *key)]
        ratios = {}
        for provider, field in (("eager", "ms"), ("compile", "ms"), ("floor", "ms"),
                                ("eager", "peak_extra_mb")):
            other = full.get((provider, *key))
            ratios[provider, field] = (other[field] / fused[field]
                                       if other and fused[field] else math.nan)
        tokens, d_in, d_out = key
        print(f"  N={tokens:6d} {d_in}x{d_out}:  {ratios['eager', 'ms']:.2f} | "
              f"{ratios['compile', 'ms']:.2f} | {1 / ratios['floor', 'ms']:.2f} | "
              f"{1 / ratios['eager', 'peak_extra_mb']:.2f}")


def write_csv(rows: list[dict], path: str) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        writer.writeheader()
        writer.writerows(rows)


def plot(rows: list[dict], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shapes = sorted({(r["d_in"], r["d_out"]) for r in rows if r["sweep"] == "linear"})
    has_eltwise = any(r["sweep"] == "elementwise" for r in rows)
    ncols = max(1, len(shapes) + has_eltwise)
    fig, axes = plt.subplots(2, ncols, figsize=(4 * ncols, 7), squeeze=False)
    for col, (d_in, d_out) in enumerate(shapes):
        for row_i, key, label in ((0, "ms", "ms (full fwd+bwd)"), (1, "peak_extra_mb", "peak MiB")):
            ax = axes[row_i][col]
            for provider in PROVIDERS:
                pts = sorted((r["tokens"], r[key]) for r in rows
                             if r["sweep"] == "linear" and r["mode"] == "full"
                             and r["provider"] == provider
                             and (r["d_in"], r["d_out"]) == (d_in, d_out)
                             and not math.isnan(r[key]))
                if pts:
                    ax.plot(*zip(*pts, strict=True), marker="o", label=provider)
            ax.set_xscale("log", base=2)
            if ax.lines and key == "ms":
                ax.set_yscale("log")
            if not ax.lines and key == "peak_extra_mb":
                ax.text(0.5, 0.5, "peak memory: CUDA only", ha="center", transform=ax.transAxes)
            ax.set_title(f"{d_in}x{d_out}")
            ax.set_xlabel("tokens")
            ax.set_ylabel(label)
            if ax.lines:
                ax.legend(fontsize=7)
    if has_eltwise:
        ax = axes[0][ncols - 1]
        for provider in PROVIDERS:
            for d in sorted({r["d_in"] for r in rows if r["sweep"] == "elementwise"}):
                pts = sorted((r["tokens"], r["gbps"]) for r in rows
                             if r["sweep"] == "elementwise" and r["mode"] == "full"
                             and r["provider"] == provider and r["d_in"] == d)
                if pts:
                    ax.plot(*zip(*pts, strict=True), marker="o", label=f"{provider} D={d}")
        ax.set_xscale("log", base=2)
        ax.set_title("elementwise (no weight)")
        ax.set_xlabel("tokens")
        ax.set_ylabel("GB/s (x, target read; dx written)")
        ax.legend(fontsize=7)
        axes[1][ncols - 1].axis("off")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
    from gwtn_dist.benchmarks.kernels import add_arguments

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_arguments(p)
    return p.parse_args(argv)


def _ints(text: str, what: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v]
    except ValueError:
        raise ValueError(f"{what}: expected a comma list of integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise ValueError(f"{what}: expected positive integers, got {text!r}")
    return values


def _listed(text: str, allowed: tuple[str, ...], what: str) -> list[str]:
    values = [v for v in text.split(",") if v]
    unknown = [v for v in values if v not in allowed]
    if unknown or not values:
        raise ValueError(f"{what}: {', '.join(unknown) or 'nothing'} given; choose from "
                         f"{', '.join(allowed)}")
    return values


@dataclass
class Plan:
    """What one benchmark run measures, resolved from the options."""

    device: torch.device
    dtype: torch.dtype
    cases: list[Case]
    providers: list[str]
    modes: list[str]
    reps: int
    warmup: int
    out: str
    notes: list[str]


def resolve(args: argparse.Namespace) -> Plan:
    """The plan of a run; ValueError with one line for options that make no sense here.

    On CPU the defaults are the quick sizes with eager PyTorch and the matmul floor: the fused
    kernel runs on CPU only in Triton's interpreter (correct, but thousands of times slower
    than compiled, so its time means nothing), and ``torch.compile`` spends minutes compiling
    one kernel per shape. Asking for ``--full`` or ``--providers`` overrides that.
    """
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is visible here")
    if device.type not in ("cuda", "cpu"):
        raise ValueError(f"--device {args.device}: cuda or cpu")
    on_cpu = device.type == "cpu"
    quick = args.quick or (on_cpu and not args.full)
    dtype = DTYPES[args.dtype] if args.dtype else (torch.float32 if on_cpu else torch.bfloat16)
    tokens = _ints(args.tokens, "--tokens") if args.tokens else \
        (QUICK_TOKENS if quick else DEFAULT_TOKENS)
    if args.shapes:
        try:
            shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",") if s]
        except ValueError:
            raise ValueError(f"--shapes: expected D_inxD_out pairs, e.g. 768x768, got "
                             f"{args.shapes!r}") from None
        if not shapes or any(len(s) != 2 or min(s) < 1 for s in shapes):
            raise ValueError(f"--shapes: expected D_inxD_out pairs, got {args.shapes!r}")
    else:
        shapes = QUICK_SHAPES if quick else DEFAULT_SHAPES
    widths = _ints(args.widths, "--widths") if args.widths else \
        (QUICK_ELTWISE_WIDTHS if quick else DEFAULT_ELTWISE_WIDTHS)
    if args.reps is not None and args.reps < 1:
        raise ValueError(f"--reps: a positive number, got {args.reps}")
    default_providers = "eager,floor" if on_cpu and not args.full else ",".join(PROVIDERS)
    providers = _listed(args.providers or default_providers, PROVIDERS, "--providers")
    if args.no_compile:
        providers = [p for p in providers if p != "compile"]
    modes = _listed(args.modes, MODES, "--modes")
    sweeps = _listed(args.sweeps, ("linear", "elementwise"), "--sweeps")
    notes = []
    if on_cpu:
        notes.append("note: on CPU; absolute times and the fused kernel's speed-up need a GPU "
                     "(here the fused Triton kernel would only run in Triton's interpreter, so it "
                     "is skipped)")
    cases = []
    if "linear" in sweeps:
        cases += [Case("linear", n, di, do, dtype, device) for di, do in shapes for n in tokens]
    if "elementwise" in sweeps:
        cases += [Case("elementwise", n, d, d, dtype, device) for d in widths for n in tokens]
    return Plan(device, dtype, cases, providers, modes, args.reps or (3 if quick else 20),
                1 if quick else 3, args.out, notes)


def run(plan: Plan) -> list[dict]:
    """Time every case of ``plan``; write ``imitation_bench.csv`` and ``.png`` to its folder."""
    device, dtype = plan.device, plan.dtype
    compiled = _compiled_reference() if "compile" in plan.providers else None
    peak_bw = peak_bandwidth_gbps(device)
    title = f"imitation loss on {device_name(device)} ({str(dtype).split('.')[-1]})"
    print(title)
    for note in plan.notes:
        print(note)
    rows = []
    for case in plan.cases:
        rows += run_case(case, plan.providers, plan.modes, plan.reps, plan.warmup, compiled,
                         peak_bw)
        if device.type == "cuda":
            torch.cuda.empty_cache()

    os.makedirs(plan.out, exist_ok=True)
    csv_path = os.path.join(plan.out, "imitation_bench.csv")
    png_path = os.path.join(plan.out, "imitation_bench.png")
    write_csv(rows, csv_path)
    plot(rows, png_path, title)
    print_table(rows)
    print_summary(rows)
    if peak_bw:
        print(f"peak bandwidth of this GPU: {peak_bw:.0f} GB/s")
    print(f"csv: {csv_path}")
    print(f"plot: {png_path}")
    return rows


def run_command(args: argparse.Namespace) -> None:
    """Resolve the options (a bad one is a ``ConfigError``: one line, exit 2) and run."""
    # Here, not at the top: the GPU check runs this module's main() on a machine without
    # DeepSpeed or webdataset, which the config module's imports reach.
    from gwtn_dist.config import ConfigError

    try:
        plan = resolve(args)
    except ValueError as exc:
        raise ConfigError(f"gwtn bench kernels: {exc}") from None
    run(plan)


def main(argv=None) -> list[dict]:
    try:
        plan = resolve(parse_args(argv))
    except ValueError as exc:
        raise SystemExit(f"imitation_bench: error: {exc}") from None
    return run(plan)


if __name__ == "__main__":
    main()
