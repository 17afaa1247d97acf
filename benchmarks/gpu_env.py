"""The GPU check's first part: can this machine run the others? About 30 seconds.

Checks, in order: the CUDA build of torch and the GPU it sees; triton (>= 3.4: the kernels read
``triton.knobs``) and one trivial Triton kernel launched (on a GPU its first compile builds
Triton's C driver, which needs a C compiler and ``Python.h``: both checked first, so a failure
names them); every module the other parts import (pytest for the kernel tests; numpy and yaml,
and the checkout's own imitate stage with webdataset stood in for, for the training part) and
the optional ones (pytest-xdist: parallel compiles; matplotlib: one benchmark test; DeepSpeed
and webdataset are never needed).

Prints the details, then ONE line: ``env: ok …`` (status 0) or ``env: MISSING …`` naming each
missing thing and how to get it (status 2). Under ``TRITON_INTERPRET=1`` without a GPU (the CPU
rehearsal) the GPU is not required and the launch runs in Triton's interpreter.

    python3 benchmarks/gpu_env.py
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import shutil
import sys
import sysconfig
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.checkout import stub_if_missing, use_checkout

WHEEL_HINT = "carry wheels (docs/profiling.md, 'What env may say is missing')"


def main() -> int:
    rehearsal = os.environ.get("TRITON_INTERPRET", "").strip().lower() in {"1", "true", "yes", "on"}
    missing: list[str] = []  # "what: how to fix"
    facts: list[str] = []
    py = f"{sys.version_info[0]}.{sys.version_info[1]}"
    print(f"python {sys.version.split()[0]} ({sys.executable})")

    try:
        import torch
    except ImportError:
        print("env: MISSING torch: install a CUDA build of torch (./setup.sh, or use the "
              "machine's python3)")
        return 2
    facts.append(f"torch {torch.__version__}")
    if torch.version.cuda is None and not rehearsal:
        missing.append(f"a CUDA build of torch (torch {torch.__version__} is a CPU build): "
                       f"TORCH_INDEX_URL=https://download.pytorch.org/whl/cuXYZ ./setup.sh")
    elif not torch.cuda.is_available() and not rehearsal:
        missing.append(f"a GPU torch can use (torch {torch.__version__}, CUDA "
                       f"{torch.version.cuda}, sees none): check nvidia-smi and the driver")
    elif torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        facts.append(f"CUDA {torch.version.cuda}, {torch.cuda.get_device_name()} "
                     f"(sm_{major}{minor})")
    else:
        facts.append("CPU rehearsal (TRITON_INTERPRET=1: timings mean nothing)")
    floor = (2, 13)
    if tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2]) < floor:
        facts.append(f"torch below setup.py's floor {floor[0]}.{floor[1]}: the check runs from "
                     f"the checkout, untested on this torch")

    # Triton compiles its C driver with CC, else gcc, else clang, against this Python's headers.
    cc = os.environ.get("CC") or shutil.which("gcc") or shutil.which("clang")
    include = sysconfig.get_paths()["include"]
    if cc is None:
        missing.append("a C compiler for Triton's driver: apt-get install gcc (or CC=/path)")
    else:
        facts.append(f"C compiler {cc}")
    if not (Path(include) / "Python.h").is_file():
        missing.append(f"Python.h in {include} for Triton's driver: apt-get install "
                       f"python{py}-dev")

    triton_ok = False
    try:
        import triton
        import triton.language as tl

        facts.append(f"triton {triton.__version__}")
        if not hasattr(triton, "knobs"):
            missing.append(f"triton >= 3.4 (the kernels read triton.knobs; this is "
                           f"{triton.__version__}): the triton of torch >= 2.8")
        else:
            triton_ok = True
    except ImportError:
        missing.append("triton: it comes with a CUDA build of torch (pip install torch from a "
                       "CUDA index), or " + WHEEL_HINT)
    if triton_ok and not (missing and not rehearsal and not torch.cuda.is_available()):
        dev = "cuda" if torch.cuda.is_available() else "cpu"

        @triton.jit
        def add_one(x_ptr, n, BLOCK: tl.constexpr):
            offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
            ok = offs < n
            tl.store(x_ptr + offs, tl.load(x_ptr + offs, mask=ok) + 1.0, mask=ok)

        x = torch.zeros(1000, device=dev)
        start = time.perf_counter()
        try:
            add_one[(triton.cdiv(1000, 256),)](x, 1000, BLOCK=256)
            if dev == "cuda":
                torch.cuda.synchronize()
            assert bool((x == 1).all()), "wrong result"
            facts.append(f"a Triton launch ok ({time.perf_counter() - start:.1f} s incl. compile)")
        except Exception as e:  # noqa: BLE001 - any failure of the first launch (it builds
            # Triton's C driver on a GPU) is what this part must name, whatever its type
            first = (str(e).strip().splitlines() or [""])[0][:200]
            missing.append(f"a working Triton launch ({type(e).__name__}: {first})")

    for module, why in (("pytest", "the kernel tests"), ("numpy", "the training part"),
                        ("yaml", "the training part (PyYAML)")):
        if importlib.util.find_spec(module) is None:
            missing.append(f"{module} for {why}: {WHEEL_HINT}")
    optional = {m: importlib.util.find_spec(m) is not None
                for m in ("xdist", "matplotlib", "deepspeed", "webdataset")}
    facts.append(", ".join(f"{m} {'yes' if v else 'no'}" for m, v in optional.items()))

    # The checkout's own modules, as the parts import them (webdataset and braceexpand stood in
    # for, as the training part does). Each missing module is stood in for in turn, so one run
    # names all.
    use_checkout()
    from benchmarks.imitation_run import STOOD_IN  # what the training part stands in for

    for name in STOOD_IN:
        stub_if_missing(name)
    absent: list[str] = []
    for _ in range(12):
        try:
            for module in ("gwtn_dist.kernels", "gwtn_dist.stages.imitate",
                           "gwtn_dist.distributed.runtime", "benchmarks.kernel_check",
                           "benchmarks.imitation_run"):
                importlib.import_module(module)
            if triton_ok:
                importlib.import_module("gwtn_dist.kernels.imitation.kernel")
            break
        except ImportError as e:
            name = (e.name or str(e)).split(".")[0]
            if name in absent or name.startswith(("gwtn_dist", "benchmarks")):
                absent.append(f"{name} ({e})")
                break
            absent.append(name)
            stub_if_missing(name)
            for loaded in [m for m in sys.modules if m.startswith(("gwtn_dist.", "benchmarks."))]:
                if loaded != "gwtn_dist.kernels" and not loaded.startswith("gwtn_dist.kernels."):
                    del sys.modules[loaded]  # import them again, past the stand-in
    if absent:
        missing.append(f"{', '.join(absent)} (imported by the checkout): {WHEEL_HINT}")
    else:
        facts.append("the checkout imports")

    for fact in facts:
        print(f"  {fact}")
    if missing:
        print("env: MISSING " + "; ".join(missing))
        return 2
    print("env: ok — " + "; ".join(facts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
