"""The fused imitation loss on one CUDA GPU against the issue's goals (issue 15).

Providers, each timed as a full forward + backward: ``fused`` (``imitation_mse``, Triton),
``eager`` (``imitation_mse_reference``), ``compile`` (``torch.compile`` of the reference,
static shapes) and, for the linear cases, ``floor`` (the three GEMMs any implementation needs:
y = x Wᵀ, dx = g W, dW = gᵀ x). Cases: ``linear`` (x (N, D_in) lifted by W (D_out, D_in) + b,
as at a point with a bridge) and ``elementwise`` (no weight), in bf16 and in the training
path's dtype (fp32 features, TF32 allowed as ``dist.tf32`` does by default), with and without a
row mask (BERT's padding). Times are medians of ``triton.testing.do_bench``, which flushes the
L2 cache before every repetition; memory is the peak allocated during one call above what was
allocated before it (the gradients it leaves included).

Goals (per linear case): fused ≥ 1.5× faster than eager, ≥ 1.15× faster than torch.compile,
≤ 1.2× the GEMM floor, extra peak memory ≤ 30% of eager's; elementwise: ≥ 80% of the GPU's
peak memory bandwidth (where its peak is known). Misses are reported, not errors: the exit
status is 0 unless something failed to run, 2 without a CUDA GPU.

    python3 benchmarks/kernel_check.py OUT_DIR [--quick] [--no-compile]

writes ``OUT_DIR/kernel_bench.csv`` (one row per case and provider) and
``OUT_DIR/kernel_goals.csv`` (one row per case: ratios and whether each goal is met).
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import sys
from collections.abc import Callable
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.checkout import require_cuda, use_checkout

GOALS = {"eager_x": 1.5, "compile_x": 1.15, "floor_ratio": 1.2, "mem_ratio": 0.30,
         "pct_peak_bw": 80.0}
# (tokens N, D_in, D_out): BERT-base-like and wide-lift shapes. Two, so that the full sweep
# (12 autotuned linear keys at most, 16 torch.compile graphs) fits the GPU check's 8 minutes.
LINEAR = [(8192, 768, 768), (65536, 512, 2048)]
ELEMENTWISE = [(262144, 2048)]
QUICK_LINEAR = [(8192, 512, 2048)]
QUICK_ELEMENTWISE = [(65536, 1024)]
# --allow-cpu: a smoke test of this script (Triton's interpreter, a clock instead of do_bench).
CPU_LINEAR = [(64, 16, 32)]
CPU_ELEMENTWISE = [(128, 32)]


def timed_ms(fn: Callable[[], object], leaves: list, device: str) -> float:
    """Median ms of ``fn()``: on CUDA by ``do_bench`` (L2 flushed before every repetition,
    gradients reset in between), elsewhere by the clock (a smoke test only)."""
    if device == "cuda":
        from triton.testing import do_bench

        return do_bench(fn, warmup=25, rep=100, grad_to_none=leaves, return_mode="median")
    import torch

    from gwtn_dist.benchmarks.timing import median_ms

    def fresh():
        for v in leaves:
            v.grad = None

    return median_ms(lambda _: fn(), torch.device(device), setup=fresh, reps=3, warmup=1)


def peak_extra_mb(fn: Callable[[], object], device: str) -> float:
    """Peak CUDA memory of one ``fn()`` above what was allocated before it, MiB (NaN off CUDA)."""
    import torch

    if device != "cuda":
        return math.nan
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    del out
    return peak / 2**20


def run_case(sweep: str, n: int, d_in: int, d_out: int, dtype, tf32: bool, masked: bool,
             compiled, providers: list[str], peak_bw: float | None,
             dev: str = "cuda") -> list[dict]:
    """Every provider on one case: a row each (ms, peak extra MiB, GB/s for elementwise)."""
    import torch
    from gwtn_dist.kernels import imitation_mse, imitation_mse_reference

    torch.backends.cuda.matmul.allow_tf32 = tf32
    g = torch.Generator(device=dev).manual_seed(0)
    x = torch.randn(n, d_in, device=dev, dtype=dtype, generator=g).requires_grad_()
    linear = sweep == "linear"
    t = torch.randn(n, d_out if linear else d_in, device=dev, dtype=dtype, generator=g)
    w = b = None
    if linear:
        w = (torch.randn(d_out, d_in, device=dev, dtype=dtype, generator=g)
             / d_in**0.5).requires_grad_()
        b = torch.zeros(d_out, device=dev, dtype=dtype).requires_grad_()
    mask = (torch.rand(n, device=dev, generator=g) > 0.15) if masked else None
    leaves = [v for v in (x, w, b) if v is not None]

    def loss_fn(fn):
        return lambda: fn(x, t, w, b, mask=mask).backward()

    fns = {"fused": loss_fn(imitation_mse), "eager": loss_fn(imitation_mse_reference)}
    if compiled is not None:
        fns["compile"] = loss_fn(compiled)
    if linear:
        x2, w2 = x.detach(), w.detach()
        gy = torch.randn(n, d_out, device=dev, dtype=dtype, generator=g)
        fns["floor"] = lambda: (torch.mm(x2, w2.t()), torch.mm(gy, w2), torch.mm(gy.t(), x2))
    # The fused loss must agree with the reference before its time means anything. Checked
    # with gradients on, as timed: a loss-only call is another specialisation (and tuning key),
    # whose compiles the GPU check's minutes need not pay.
    with torch.no_grad():
        ref = float(imitation_mse_reference(x.double(), t.double(),
                                            None if w is None else w.double(),
                                            None if b is None else b.double(), mask=mask))
    got = float(imitation_mse(x, t, w, b, mask=mask))
    rel = abs(got - ref) / max(abs(ref), 1e-30)
    rows = []
    for name, fn in fns.items():
        if name not in providers:
            continue
        for v in leaves:
            v.grad = None
        ms = timed_ms(fn, leaves, dev)
        for v in leaves:
            v.grad = None
        mem = peak_extra_mb(fn, dev)
        gbps = pct = math.nan
        if not linear and name != "floor":  # x and target read, dx written
            gbps = 3 * n * d_in * torch.finfo(dtype).bits / 8 / (ms * 1e-3) / 1e9
            pct = 100 * gbps / peak_bw if peak_bw else math.nan
        rows.append({"sweep": sweep, "dtype": str(dtype).split(".")[-1], "tf32": tf32,
                     "mask": masked, "tokens": n, "d_in": d_in, "d_out": d_out if linear else d_in,
                     "provider": name, "ms": round(ms, 4), "peak_extra_mb": round(mem, 1),
                     "gbps": round(gbps, 1), "pct_peak_bw": round(pct, 1),
                     "fused_loss_rel_err": f"{rel:.1e}"})
    torch.backends.cuda.matmul.allow_tf32 = False
    return rows


def _speedup(by: dict[str, dict], provider: str) -> float:
    """``provider``'s time over the fused one's (> 1: fused is faster); NaN if not measured."""
    if provider not in by or not by["fused"]["ms"]:
        return math.nan
    return round(by[provider]["ms"] / by["fused"]["ms"], 3)


def goals(rows: list[dict]) -> list[dict]:
    """Per case: fused against the others, and whether each goal is met."""
    cases: dict[tuple, dict[str, dict]] = {}
    for r in rows:
        key = tuple(r[k] for k in ("sweep", "dtype", "tf32", "mask", "tokens", "d_in", "d_out"))
        cases.setdefault(key, {})[r["provider"]] = r
    out = []
    for key, by in cases.items():
        f = by.get("fused")
        if f is None:
            continue
        rec = dict(zip(("sweep", "dtype", "tf32", "mask", "tokens", "d_in", "d_out"), key,
                       strict=True))
        rec["eager_x"] = _speedup(by, "eager")
        rec["compile_x"] = _speedup(by, "compile")
        rec["floor_ratio"] = round(f["ms"] / by["floor"]["ms"], 3) if "floor" in by else math.nan
        eager_mem = by["eager"]["peak_extra_mb"] if "eager" in by else math.nan
        rec["mem_ratio"] = round(f["peak_extra_mb"] / eager_mem, 3) if eager_mem else math.nan
        rec["pct_peak_bw"] = f["pct_peak_bw"]
        for name, goal in GOALS.items():
            v = rec[name]
            if isinstance(v, float) and math.isnan(v):
                rec[f"{name}_ok"] = ""
            else:
                rec[f"{name}_ok"] = v <= goal if name in ("floor_ratio", "mem_ratio") else v >= goal
        out.append(rec)
    return out


def write_csv(rows: list[dict], path: Path) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def print_goals(recs: list[dict]) -> None:
    def show(rec, name, fmt):
        v, ok = rec[name], rec[f"{name}_ok"]
        return "-" if ok == "" else f"{v:{fmt}}{'' if ok else ' MISS'}"

    print(f"\ngoals: eager x >= {GOALS['eager_x']}, compile x >= {GOALS['compile_x']}, "
          f"fused/floor <= {GOALS['floor_ratio']}, extra peak memory fused/eager <= "
          f"{GOALS['mem_ratio']}, elementwise >= {GOALS['pct_peak_bw']:.0f}% of peak bandwidth")
    print(f"{'case':44s} {'eager x':>10s} {'compile x':>10s} {'/floor':>10s} "
          f"{'mem/eager':>10s} {'% peak bw':>10s}")
    for r in recs:
        name = (f"{r['sweep']} {r['dtype']}{' tf32' if r['tf32'] else ''}"
                f"{' mask' if r['mask'] else ''} N={r['tokens']} {r['d_in']}x{r['d_out']}")
        print(f"{name:44s} {show(r, 'eager_x', '.2f'):>10s} {show(r, 'compile_x', '.2f'):>10s} "
              f"{show(r, 'floor_ratio', '.2f'):>10s} {show(r, 'mem_ratio', '.2f'):>10s} "
              f"{show(r, 'pct_peak_bw', '.0f'):>10s}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("out", help="folder for kernel_bench.csv and kernel_goals.csv")
    p.add_argument("--quick", action="store_true", help="one linear and one elementwise shape")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile provider")
    p.add_argument("--allow-cpu", action="store_true",
                   help="tiny shapes on CPU in Triton's interpreter: a smoke test of this script")
    args = p.parse_args(argv)
    if args.allow_cpu:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is first imported
    else:
        require_cuda()
    use_checkout()
    import torch
    from gwtn_dist.kernels import imitation_mse_reference

    from gwtn_dist.benchmarks.timing import peak_bandwidth_gbps

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    compiled = None
    if not args.no_compile:
        import torch._dynamo

        for name in ("recompile_limit", "cache_size_limit"):  # one graph per shape and mask
            if hasattr(torch._dynamo.config, name):
                setattr(torch._dynamo.config, name, 256)
        compiled = torch.compile(imitation_mse_reference, dynamic=False)
    dev = "cpu" if args.allow_cpu else "cuda"
    peak_bw = peak_bandwidth_gbps(torch.device(dev))
    name = "CPU (smoke test)" if args.allow_cpu else torch.cuda.get_device_name()
    print(f"{name}: torch {torch.__version__}, peak bandwidth {peak_bw or 'unknown'} GB/s",
          flush=True)
    providers = ["fused", "eager", "floor"] + ([] if args.no_compile else ["compile"])
    # bf16, and the training path's fp32 features with TF32 allowed (dist.tf32's default).
    dtypes = [(torch.bfloat16, False), (torch.float32, True)]
    linear, eltwise = ((CPU_LINEAR, CPU_ELEMENTWISE) if args.allow_cpu
                       else (QUICK_LINEAR, QUICK_ELEMENTWISE) if args.quick
                       else (LINEAR, ELEMENTWISE))
    cases = [("linear", n, di, do) for n, di, do in linear]
    cases += [("elementwise", n, d, d) for n, d in eltwise]
    rows = []
    for sweep, n, di, do in cases:
        for dtype, tf32 in dtypes:
            for masked in (False, True):
                new = run_case(sweep, n, di, do, dtype, tf32, masked, compiled, providers,
                               peak_bw, dev)
                rows += new
                print(f"  {sweep} {str(dtype)[6:]} mask={masked} N={n} {di}x{do}: " + ", ".join(
                    f"{r['provider']} {r['ms']:.3f} ms" for r in new), flush=True)
                # Written after every case: a run stopped at its time limit keeps what it timed.
                write_csv(rows, out / "kernel_bench.csv")
                write_csv(goals(rows), out / "kernel_goals.csv")
                if dev == "cuda":
                    torch.cuda.empty_cache()
    recs = goals(rows)
    print_goals(recs)
    print(f"wrote {out / 'kernel_bench.csv'} and {out / 'kernel_goals.csv'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
