"""Compile time of one part of the GPU check, and in Triton's CPU interpreter how many compiles a
GPU would need.

Loaded as a pytest plugin (``-p benchmarks.compile_timer``) or as a launcher
(``python -m benchmarks.compile_timer SCRIPT ARGS…``, which runs SCRIPT as ``__main__``), it
appends one JSON line per process to ``$GPU_CHECK_COMPILE_LOG`` when the process ends:

* ``compiles``, ``cache_hits``, ``compile_s``: what Triton's compiler reported through
  ``triton.knobs.compilation.listener`` (its own stages: IR to cubin; the small C launcher it
  builds per new kernel signature is not included);
* ``torch_compile_s``: the seconds torch.compile spent compiling (dynamo's own records);
* ``census`` (interpreter only, where nothing is compiled): every launch of our kernels recorded
  by its specialisation as the GPU JIT would see it (tensor dtypes and 16-byte alignment, integers
  equal to 1 or divisible by 16, constexpr values, the tile), so ``summarize`` can say how many
  compiles the same run would cost on a GPU with pinned tiles and with autotuning.

``python -m benchmarks.compile_timer --summary LOG`` prints one line for the part.
"""

from __future__ import annotations

import ast
import atexit
import inspect
import json
import os
import runpy
import sys
from pathlib import Path

LOG_ENV = "GPU_CHECK_COMPILE_LOG"
_state = {"compiles": 0, "cache_hits": 0, "compile_s": 0.0}
_census: dict[str, list] = {"launches": []}
_installed = False

# The GPU tiles the linear kernel's autotuner tries per x dtype (kernel._GPU_LINEAR_TILES after
# pruning), read from the kernel module when the census is summarized.
TILE_KEYS = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M", "num_warps", "num_stages")


def _listener(*, src, metadata, metadata_group, times, cache_hit, **_):
    if cache_hit:
        _state["cache_hits"] += 1
    else:
        _state["compiles"] += 1
        _state["compile_s"] += times.total / 1e6  # microseconds


def _spec_of(fn, args: tuple, kwargs: dict) -> tuple:
    """A launch as the GPU JIT specialises it: per argument its kind and hints; constexprs and
    launch options by value (the tile left out: kept apart)."""
    import torch

    params = inspect.signature(fn).parameters
    names = list(params)
    values = {**dict(zip(names, args, strict=False)), **kwargs}
    spec = []
    for name in names:
        v = values.get(name)
        constexpr = "constexpr" in str(params[name].annotation)
        if name in TILE_KEYS:
            continue
        if torch.is_tensor(v):
            spec.append((name, str(v.dtype), v.data_ptr() % 16 == 0))
        elif constexpr or v is None or isinstance(v, bool):
            spec.append((name, repr(v)))
        elif isinstance(v, int):
            spec.append((name, "int", v == 1, v % 16 == 0, abs(v) >= 2**31))
        else:
            spec.append((name, type(v).__name__))
    return tuple(spec)


def _install_census() -> None:
    """Record every interpreted launch of our kernels (the interpreter compiles nothing)."""
    from triton.runtime.interpreter import InterpretedFunction

    real = InterpretedFunction.run

    def run(self, *args, grid, warmup, **kwargs):
        name = getattr(self.fn, "__name__", "?")
        if name.startswith("_") and name.endswith("_kernel"):
            tile = tuple(kwargs.get(k) for k in TILE_KEYS)
            dtype = next((str(a.dtype) for a in args if hasattr(a, "dtype")), "")
            _census["launches"].append([name, repr(_spec_of(self.fn, args, kwargs)),
                                        repr(tile), dtype])
        return real(self, *args, grid=grid, warmup=warmup, **kwargs)

    InterpretedFunction.run = run


def install() -> None:
    """Start counting in this process (idempotent); writes its line at exit."""
    global _installed
    if _installed or not os.environ.get(LOG_ENV):
        return
    _installed = True
    import triton

    if getattr(triton.knobs.runtime, "interpret", False):
        _install_census()
    else:
        triton.knobs.compilation.listener = _listener
    atexit.register(_write)


def _torch_compile_seconds() -> float:
    utils = sys.modules.get("torch._dynamo.utils")  # never imported here: nothing was compiled
    compilation_time_metrics = getattr(utils, "compilation_time_metrics", None)
    if not compilation_time_metrics:  # (importing dynamo at exit can fail)
        return 0.0
    # The outermost records: a frame's compile (forward, inductor included) and the backward's.
    return round(sum(sum(v) for k, v in compilation_time_metrics.items()
                     if k.endswith("compile_inner") or "bw_compiler" in k), 2)


def _write() -> None:
    record = {"pid": os.getpid(), **_state, "torch_compile_s": _torch_compile_seconds()}
    if _census["launches"]:
        record["census"] = _census["launches"]
    with open(os.environ[LOG_ENV], "a") as f:
        f.write(json.dumps(record) + "\n")


# --- pytest plugin hooks ---------------------------------------------------------------------

def pytest_configure(config):
    install()


def pytest_sessionfinish(session, exitstatus):
    if _installed:  # xdist workers and the controller each write their own line
        _write()
        atexit.unregister(_write)


# --- the census, as compiles a GPU run would need --------------------------------------------

def gpu_compiles(launches: list[list]) -> dict[str, int]:
    """Compiles of the recorded launches on a GPU: ``pinned`` (one tile per dtype) and
    ``autotuned`` (every candidate tile of the dtype at each new tuning key, then the chosen
    one for specialisations first seen after their key was tuned)."""
    from gwtn_dist.kernels.imitation import kernel as K

    per_dtype = {"16bit": len(K._GPU_LINEAR_TILES["16bit"]),
                 "32bit": len(K._GPU_LINEAR_TILES["32bit"])}
    pinned, tuned, keys = set(), set(), {}
    other = set()
    for name, spec, tile, dtype in launches:
        if name != "_linear_mse_kernel":
            other.add((name, spec, tile))
            continue
        pinned.add((spec, dtype))
        s = ast.literal_eval(spec)  # our own repr: tuples of literals
        d = {item[0]: item[1:] for item in s}
        key = (d.get("D_in"), d.get("D_out"), d.get("M_BUCKET"),
               tuple(item[1] for item in s if len(item) == 3 and item[1].startswith("torch.")))
        n = per_dtype["32bit" if dtype == "torch.float32" else "16bit"]
        if key not in keys:
            keys[key] = {spec}
            tuned.update((spec, i) for i in range(n))
        elif spec not in keys[key]:
            keys[key].add(spec)
            tuned.add((spec, "best"))
    return {"other_kernels": len(other), "linear_pinned": len(pinned),
            "linear_autotuned": len(tuned), "tuning_keys": len(keys),
            "pinned": len(other) + len(pinned), "autotuned": len(other) + len(tuned)}


def summarize(log: Path) -> str:
    """One line for a part: Triton compiles and seconds, torch.compile seconds, and in the
    interpreter the census's GPU compile counts."""
    if not log.is_file():
        return "compile: nothing recorded"
    recs = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    compiles = sum(r["compiles"] for r in recs)
    hits = sum(r["cache_hits"] for r in recs)
    secs = sum(r["compile_s"] for r in recs)
    torch_s = sum(r.get("torch_compile_s", 0.0) for r in recs)
    line = (f"compile: {compiles} Triton compiles ({hits} from the cache), {secs:.1f} s in "
            f"Triton's compiler summed over {len(recs)} process(es); torch.compile {torch_s:.1f} s")
    launches = [launch for r in recs for launch in r.get("census", [])]
    if launches:
        c = gpu_compiles(launches)
        line += (f"; interpreter census of {len(launches)} launches: a GPU would compile "
                 f"{c['pinned']} kernels with pinned tiles, {c['autotuned']} with autotuning "
                 f"({c['tuning_keys']} tuning keys of the linear kernel)")
    return line


def main(argv: list[str]) -> int:
    if argv[:1] == ["--summary"]:
        print(summarize(Path(argv[1])))
        return 0
    script, *rest = argv
    sys.argv = [script, *rest]
    install()
    runpy.run_path(script, run_name="__main__")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
