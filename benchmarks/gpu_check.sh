#!/usr/bin/env bash
# The repo's GPU check (issue 15), in one go on a machine with one CUDA GPU that has torch and
# triton (DeepSpeed and webdataset may be missing):
#   1. the imitation kernel's tests on CUDA (tests/test_imitation_kernel.py, GPU cases included);
#   2. the kernel benchmark: fused vs eager vs torch.compile vs the GEMM floor, bf16 and the
#      training path's fp32 (TF32), with and without a mask, L2 flushed; figures against the
#      issue's goals (benchmarks/kernel_check.py);
#   3. a short single-GPU imitation run in bf16 with each loss backend (triton, reference) and
#      each schedule, on synthetic in-memory batches: step times (benchmarks/imitation_run.py).
#
# Usage, from anywhere:  [PYTHON=python] bash benchmarks/gpu_check.sh [OUT_DIR] [--quick]
# PYTHON defaults to the repo's .venv when ./setup.sh made one, else python3.
# OUT_DIR defaults to $OUT; everything it writes (logs, CSVs) goes there. --quick: one shape per
# benchmark sweep and fewer imitation steps (about 3 minutes on an H100-class GPU, plus compiles).
# Exit status: 0 when every part ran (goal misses are reported, not failures), 1 when a part
# failed, 2 when this machine cannot run the check (no CUDA GPU, no torch or triton, no OUT_DIR).
set -uo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
OUT_DIR=${OUT:-}
QUICK=""
for arg in "$@"; do
  case "$arg" in
    --quick) QUICK=--quick ;;
    -h|--help) sed -n '2,16p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
    -*) echo "gpu_check.sh: unknown option $arg (see --help)" >&2; exit 2 ;;
    *) OUT_DIR=$arg ;;
  esac
done
if [ -z "$OUT_DIR" ]; then
  echo "gpu_check.sh: give an output folder (bash benchmarks/gpu_check.sh OUT_DIR) or set \$OUT" >&2
  exit 2
fi
mkdir -p "$OUT_DIR" || { echo "gpu_check.sh: cannot create $OUT_DIR" >&2; exit 2; }
OUT_DIR=$(cd "$OUT_DIR" && pwd)
# The Python to run: $PYTHON, else the repo's own environment (./setup.sh makes .venv), else the
# machine's python3 (a GPU machine with torch and triton installed system-wide).
if [ -n "${PYTHON:-}" ]; then PY=$PYTHON
elif [ -x "$REPO/.venv/bin/python" ]; then PY=$REPO/.venv/bin/python
else PY=python3; fi
command -v "$PY" >/dev/null || { echo "gpu_check.sh: no python: $PY not found" >&2; exit 2; }
export PYTHONUNBUFFERED=1

# What this machine has; one line and status 2 when it cannot run the check.
"$PY" - > "$OUT_DIR/env.log" <<'PYEOF' || { cat "$OUT_DIR/env.log" >&2; exit 2; }
import importlib.util, sys
try:
    import torch
except ImportError:
    print("no torch: the GPU check needs torch with CUDA"); sys.exit(2)
if not torch.cuda.is_available():
    print(f"no CUDA GPU: torch {torch.__version__} sees none (torch.cuda.is_available() is False)")
    sys.exit(2)
if importlib.util.find_spec("triton") is None:
    print("no triton: the fused imitation kernel needs the `triton` package"); sys.exit(2)
import triton
have = {m: importlib.util.find_spec(m) is not None
        for m in ("deepspeed", "webdataset", "matplotlib", "xdist")}
print(f"{torch.cuda.get_device_name()}: torch {torch.__version__}, CUDA {torch.version.cuda}, "
      f"triton {triton.__version__}; " + ", ".join(f"{m} {'yes' if v else 'no'}"
                                                     for m, v in have.items()))
PYEOF
cat "$OUT_DIR/env.log"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,memory.total \
  --format=csv >> "$OUT_DIR/env.log" 2>&1

# The checkout as the installed package looks: setup.py installs kernels/ as gwtn_dist.kernels.
SITE=$(mktemp -d)
trap 'rm -rf "$SITE"' EXIT
cp -r "$REPO/gwtn_dist" "$SITE/gwtn_dist" && cp -r "$REPO/kernels" "$SITE/gwtn_dist/kernels" || {
  echo "gpu_check.sh: cannot copy the checkout to $SITE" >&2; exit 1; }
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"

declare -A STATUS
part() {  # part NAME TIMEOUT_S COMMAND…: run, log to OUT_DIR/NAME.log, keep the status
  local name=$1 limit=$2; shift 2
  echo; echo "== $name"
  (cd "$SITE" && timeout "$limit" "$@") 2>&1 | tee "$OUT_DIR/$name.log"
  STATUS[$name]=${PIPESTATUS[0]}
}

# 1. Kernel tests. The file needs neither DeepSpeed nor webdataset; tests/conftest.py does
# (it builds data fixtures), so it is left out; the benchmark's CPU smoke test needs matplotlib.
DESELECT=()
"$PY" -c "import matplotlib" 2>/dev/null || DESELECT=(-k "not benchmark_quick_cpu")
XDIST=()
"$PY" -c "import xdist" 2>/dev/null && XDIST=(-n 8)  # Triton compiles in parallel
part kernel_tests 600 "$PY" -m pytest -q -p no:cacheprovider --noconftest \
  --import-mode=importlib -o addopts="-rs" "${XDIST[@]}" "${DESELECT[@]}" \
  "$REPO/tests/test_imitation_kernel.py"

# 2. Kernel benchmark against the goals.
part kernel_bench 900 "$PY" "$REPO/benchmarks/kernel_check.py" "$OUT_DIR/kernel" $QUICK

# 3. Single-GPU imitation runs in bf16, each backend and schedule.
STEPS=40; [ -n "$QUICK" ] && STEPS=15
part imitation_run 600 "$PY" "$REPO/benchmarks/imitation_run.py" "$OUT_DIR/imitation" \
  --steps "$STEPS" --precision bf16

echo; echo "== summary (logs and CSVs in $OUT_DIR)"
failed=0
for name in kernel_tests kernel_bench imitation_run; do
  rc=${STATUS[$name]}
  case "$rc" in 0) word=ok ;; 124) word="timed out" ;; *) word="failed (status $rc)" ;; esac
  echo "$name: $word"
  [ "$rc" = 0 ] || failed=1
done
[ -f "$OUT_DIR/kernel/kernel_goals.csv" ] && echo "goals per case: $OUT_DIR/kernel/kernel_goals.csv"
[ -f "$OUT_DIR/imitation/imitation_run.csv" ] && echo "step times: $OUT_DIR/imitation/imitation_run.csv"
exit $failed
