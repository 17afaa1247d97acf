#!/usr/bin/env bash
# The repo's GPU check, in parts that each fit one call of at most 8 minutes on one H100 (first
# compiles included), on a machine with one CUDA GPU, torch and triton (DeepSpeed, webdataset and
# network access not needed; the checkout is run from where it is, on PYTHONPATH):
#   env           ~30 s: CUDA build of torch, the GPU, triton and one trivial Triton launch, the C
#                 compiler and Python.h Triton's driver needs, every module the parts import;
#                 ONE line says what is missing and how to fix it (status 2 then).
#   kernel-tests  tests/test_imitation_kernel.py on CUDA (GPU-only cases included), one pinned
#                 tile per kernel (GWTN_PIN_TILES=1: no autotuning), in parallel with xdist.
#   kernel-bench  the fused loss against eager, torch.compile and the GEMM floor, bf16 and fp32
#                 with TF32, masked or not; autotuning on (benchmarks/kernel_check.py).
#   train         the imitate stage of configs/fmnist_resnet.yaml in bf16 on synthetic batches,
#                 each loss backend and schedule, and the triton backend with model.compile
#                 (benchmarks/imitation_run.py).
#   all           the four, in order (stops after env if it fails).
#
# Usage, from anywhere:  [PYTHON=python] bash benchmarks/gpu_check.sh PART OUT_DIR [--quick] [--no-compile]
# OUT_DIR (default $OUT) gets each part's log and CSVs, and TRITON_CACHE_DIR=OUT_DIR/triton_cache
# (unless set), so a later part on the same machine reuses compiles. When $OUT is set and is not
# OUT_DIR, the part's log and CSVs are also copied flat into $OUT. --quick: one shape per
# benchmark sweep and fewer imitation steps. --no-compile: no torch.compile anywhere (the
# benchmark's compile provider, the compiled training run). PYTHON defaults to the repo's .venv
# when ./setup.sh made one, else python3.
# CPU rehearsal: TRITON_INTERPRET=1 bash benchmarks/gpu_check.sh all OUT_DIR runs every part's
# logic without a GPU (kernels in Triton's interpreter, tiny shapes, the tiny config; every timing
# is meaningless) and prints how many kernels the kernel tests would compile on a GPU.
# GPU_CHECK_TESTS='EXPR': only the kernel tests pytest's -k EXPR selects (the suite's rehearsal).
# Exit status: 0 when every part ran (goal misses are reported, not failures), 1 when a part
# failed or ran past its time, 2 when this machine cannot run the check (env's one line says why).
set -uo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PARTS="env kernel-tests kernel-bench train"
usage() { sed -n '2,29p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; }
PART="" OUT_DIR=${OUT:-} QUICK="" NO_COMPILE=""
for arg in "$@"; do
  case "$arg" in
    --quick) QUICK=--quick ;;
    --no-compile) NO_COMPILE=--no-compile ;;
    -h|--help) usage; exit 0 ;;
    -*) echo "gpu_check.sh: unknown option $arg (see --help)" >&2; exit 2 ;;
    *) if [ -z "$PART" ]; then PART=$arg; else OUT_DIR=$arg; fi ;;
  esac
done
[ -n "$PART" ] || { echo "gpu_check.sh: give a part: $PARTS or all (see --help)" >&2; exit 2; }
case " $PARTS all " in
  *" $PART "*) ;;
  *) echo "gpu_check.sh: unknown part '$PART': give one of $PARTS, all (see --help)" >&2; exit 2 ;;
esac
if [ -z "$OUT_DIR" ]; then
  echo "gpu_check.sh: give an output folder (gpu_check.sh $PART OUT_DIR) or set \$OUT" >&2
  exit 2
fi
mkdir -p "$OUT_DIR" || { echo "gpu_check.sh: cannot create $OUT_DIR" >&2; exit 2; }
OUT_DIR=$(cd "$OUT_DIR" && pwd)
if [ -n "${PYTHON:-}" ]; then PY=$PYTHON
elif [ -x "$REPO/.venv/bin/python" ]; then PY=$REPO/.venv/bin/python
else PY=python3; fi
command -v "$PY" >/dev/null || { echo "gpu_check.sh: no python: $PY not found" >&2; exit 2; }
export PYTHONUNBUFFERED=1
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-$OUT_DIR/triton_cache}
mkdir -p "$TRITON_CACHE_DIR"
REHEARSAL=0
case "${TRITON_INTERPRET:-}" in 1|true|TRUE|yes|on) REHEARSAL=1 ;; esac
[ "$REHEARSAL" = 1 ] && echo "gpu_check.sh: CPU rehearsal (TRITON_INTERPRET=1): kernels in Triton's interpreter, tiny shapes; every timing below is meaningless"

# The checkout as the installed package looks (setup.py installs kernels/ as gwtn_dist.kernels),
# first on PYTHONPATH, with benchmarks/ beside it; the parts run their scripts from this copy, so
# every import, the compile timer's included, finds one gwtn_dist (whether or not one is
# installed).
SITE=$(mktemp -d)
trap 'rm -rf "$SITE"' EXIT
cp -r "$REPO/gwtn_dist" "$SITE/gwtn_dist" && cp -r "$REPO/kernels" "$SITE/gwtn_dist/kernels" \
  && cp -r "$REPO/benchmarks" "$SITE/benchmarks" || {
  echo "gpu_check.sh: cannot copy the checkout to $SITE" >&2; exit 1; }
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"

declare -A STATUS SECONDS_TAKEN
run_part() {  # run_part NAME LIMIT_S COMMAND…: log to OUT_DIR/NAME.log, time it, sum its compiles
  local name=$1 limit=$2; shift 2
  local log="$OUT_DIR/$name.log" compile_log="$OUT_DIR/$name.compile.jsonl" start=$SECONDS
  rm -f "$compile_log"
  echo; echo "== $name (limit ${limit} s)"
  (cd "$SITE" && GPU_CHECK_COMPILE_LOG="$compile_log" timeout -k 10 "$limit" "$@") 2>&1 | tee "$log"
  STATUS[$name]=${PIPESTATUS[0]}
  SECONDS_TAKEN[$name]=$((SECONDS - start))
  local line=""
  [ -f "$compile_log" ] && line="; $(cd "$SITE" && "$PY" -m benchmarks.compile_timer --summary "$compile_log" 2>&1 | tail -1)"
  echo "[$name] ${SECONDS_TAKEN[$name]} s$line" | tee -a "$log"
}
timer=("$PY" -m benchmarks.compile_timer)  # runs a script with the compile timer on

part_env() {
  run_part env 120 "$PY" "$SITE/benchmarks/gpu_env.py"
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,memory.total \
    --format=csv >> "$OUT_DIR/env.log" 2>&1
  return 0
}

part_kernel_tests() {
  # tests/conftest.py builds data fixtures (DeepSpeed, webdataset): the file needs none of them.
  local args=(-q -p no:cacheprovider --noconftest --import-mode=importlib -o addopts="-rs"
              -p benchmarks.compile_timer) select=""
  "$PY" -c "import matplotlib" 2>/dev/null || {
    echo "kernel-tests: matplotlib is missing: the benchmark's CPU smoke test is left out"
    select="not benchmark_quick_cpu"; }
  [ -z "${GPU_CHECK_TESTS:-}" ] || select="${select:+($select) and }($GPU_CHECK_TESTS)"
  [ -z "$select" ] || args+=(-k "$select")
  if "$PY" -c "import xdist" 2>/dev/null && [ "$REHEARSAL" = 0 ]; then
    local n; n=$(nproc 2>/dev/null || echo 8); [ "$n" -gt 8 ] && n=8
    args+=(-n "$n")  # Triton compiles on the host's cores, one worker per core (up to 8)
  elif [ "$REHEARSAL" = 0 ]; then
    echo "kernel-tests: pytest-xdist is missing: the tests run one at a time (slower compiles)"
  fi
  GWTN_PIN_TILES=1 run_part kernel-tests 470 "$PY" -m pytest "${args[@]}" \
    "$REPO/tests/test_imitation_kernel.py"
}

part_kernel_bench() {
  local extra=()
  [ "$REHEARSAL" = 1 ] && extra=(--allow-cpu)
  run_part kernel-bench 470 "${timer[@]}" "$SITE/benchmarks/kernel_check.py" "$OUT_DIR/kernel" \
    $QUICK $NO_COMPILE "${extra[@]}"
}

part_train() {
  local steps=40 config="$REPO/configs/fmnist_resnet.yaml" extra=()
  [ -n "$QUICK" ] && steps=15
  local compiled=(--compiled triton)
  [ -n "$NO_COMPILE" ] && compiled=()
  if [ "$REHEARSAL" = 1 ]; then
    steps=2 config="$REPO/configs/tiny_cpu.yaml"
    extra=(--allow-cpu --compile-backend aot_eager data.batch_size=4 threads=1)
  fi
  run_part train 470 "${timer[@]}" "$SITE/benchmarks/imitation_run.py" "$OUT_DIR/imitation" \
    --config "$config" --steps "$steps" --precision bf16 "${compiled[@]}" "${extra[@]}"
}

copy_back() {  # the part's log and CSVs, flat, into $OUT (what a lent machine sends back)
  local name=$1
  [ -n "${OUT:-}" ] && [ -d "$OUT" ] && [ "$(cd "$OUT" && pwd)" != "$OUT_DIR" ] || return 0
  cp "$OUT_DIR/$name.log" "$OUT/" 2>/dev/null
  case "$name" in
    kernel-bench) cp "$OUT_DIR"/kernel/kernel_*.csv "$OUT/" 2>/dev/null ;;
    train) cp "$OUT_DIR/imitation/imitation_run.csv" "$OUT/" 2>/dev/null ;;
  esac
  return 0
}

ran=()
for name in $PARTS; do
  [ "$PART" = all ] || [ "$PART" = "$name" ] || continue
  "part_${name//-/_}"
  ran+=("$name")
  copy_back "$name"
  if [ "$name" = env ] && [ "${STATUS[env]}" != 0 ]; then
    verdict=$(grep -E '^env: (ok|MISSING)' "$OUT_DIR/env.log" | tail -1)
    echo "${verdict:-env: failed (status ${STATUS[env]}), see $OUT_DIR/env.log}" >&2
    exit 2
  fi
done

echo; echo "== summary (logs and CSVs in $OUT_DIR)"
failed=0
for name in "${ran[@]}"; do
  rc=${STATUS[$name]}
  case "$rc" in 0) word=ok ;; 124|137) word="ran past its limit" ;; *) word="failed (status $rc)" ;; esac
  echo "$name: $word, ${SECONDS_TAKEN[$name]} s"
  [ "$rc" = 0 ] || failed=1
done
[ -f "$OUT_DIR/kernel/kernel_goals.csv" ] && echo "goals per case: $OUT_DIR/kernel/kernel_goals.csv"
[ -f "$OUT_DIR/imitation/imitation_run.csv" ] && echo "step times: $OUT_DIR/imitation/imitation_run.csv"
exit $failed
