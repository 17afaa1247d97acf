#!/usr/bin/env bash
# Set up gwtn_dist on this machine, in one command, from the repository's root:
#   ./setup.sh
# 1. Debian/Ubuntu packages: Fashion-MNIST and the KJV Bible (the default run's data and a text
#    corpus), slurm-wlm and munge (the SLURM tests), iproute2 (the tests' hosts in network
#    namespaces), curl (shards over http, as webdataset reads them), python3-venv when venv is
#    missing, and what Triton compiles its GPU driver with at first launch (a C compiler,
#    Python's headers) and torch.compile's CPU code with (a C++ compiler) when missing. Only the
#    missing ones, with sudo when not root (python3 too, on a bare image). GWTN_APT=0 skips this.
# 2. A Python environment: the active venv or conda env (VIRTUAL_ENV, CONDA_PREFIX) if there is
#    one, else .venv here, made from $PYTHON (default python3; Debian's own Python refuses pip
#    installs outside a venv). `.venv` then always names the environment: in the first case it is
#    a link to the active one, so `.venv/bin/gwtn` works either way.
# 3. torch, unless one within setup.py's range is already importable there (a cluster's or a
#    container's torch is kept): TORCH_SPEC (default torch==2.13.0, the version the tests run on)
#    from TORCH_INDEX_URL when set, e.g.
#      TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu ./setup.sh     CPU build
#      TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 ./setup.sh   CUDA 12.8 build
#    (without it pip's own configuration decides which build it gets; PyPI's Linux torch is a
#    CUDA build). docs/setup.md has the details. On a machine where nvidia-smi answers, a CPU
#    build of torch is replaced by the CUDA build from TORCH_INDEX_URL, or, without one, the
#    script stops with one line naming the TORCH_INDEX_URL to pass. triton comes with a CUDA
#    build of torch (its own pin); with a CPU build, TRITON_SPEC (default triton==3.9.0, the
#    version the tests ran the kernels with in Triton's CPU interpreter) is installed.
# 4. gwtn_dist itself, editable, with the test tools: pip install -e ".[test]", held to the
#    versions in constraints.txt (the ones the tests last passed with); GWTN_CONSTRAINTS= (empty)
#    takes the newest of everything, GWTN_CONSTRAINTS=FILE another list.
# Running it again is safe and quick: what is there is kept (a changed setup.py or constraints.txt
# reinstalls).
set -euo pipefail
cd "$(dirname "$0")"
say() { echo "setup: $*"; }
fail() { echo "setup: error: $*" >&2; exit 1; }

PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
TORCH_INDEX_URL=${TORCH_INDEX_URL:-}
TRITON_SPEC=${TRITON_SPEC:-triton==3.9.0}
CONSTRAINTS=${GWTN_CONSTRAINTS-constraints.txt}
[ -z "$CONSTRAINTS" ] || [ -f "$CONSTRAINTS" ] || fail "GWTN_CONSTRAINTS=$CONSTRAINTS: no such file"
VENV=.venv

# --- which environment: an active one, or .venv here
active=${VIRTUAL_ENV:-${CONDA_PREFIX:-}}
if [ -n "$active" ] && [ "$(cd "$active" && pwd -P)" = "$(pwd -P)/$VENV" ]; then
  active=""  # our own .venv, activated: treat it as ours
fi
make_venv=0
[ -n "$active" ] || [ -x "$VENV/bin/python" ] || make_venv=1

# --- the GPU, if any: nvidia-smi answering means torch must be a CUDA build here
gpu="" driver_cuda=""
if command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1; then
  gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1)
  gpu=${gpu:-an NVIDIA GPU}
  # "CUDA Version: 13.0" in nvidia-smi's banner: the newest CUDA the driver runs
  driver_cuda=$(nvidia-smi 2>/dev/null | sed -n 's/.*CUDA Version: *\([0-9][0-9]*\.[0-9]*\).*/\1/p' | head -1)
fi
cuda_index_hint() {  # the PyTorch index of the driver's CUDA, e.g. .../whl/cu130 for 13.0
  local tag
  tag=$(echo "${driver_cuda:-12.8}" | awk -F. '{printf "cu%d%d", $1, $2}')
  echo "https://download.pytorch.org/whl/$tag"
}

# --- 1. system packages (Debian/Ubuntu)
packages=(dataset-fashion-mnist bible-kjv slurm-wlm munge iproute2 curl)
# Triton builds a small C driver on its first GPU launch (a C compiler and Python.h of the Python
# that runs it); torch.compile's CPU code needs a C++ compiler.
command -v gcc >/dev/null || command -v clang >/dev/null || packages+=(gcc)
command -v g++ >/dev/null || command -v clang++ >/dev/null || packages+=(g++)
hdr_py=$PYTHON
[ -z "$active" ] || hdr_py="$active/bin/python"
[ -n "$active" ] || [ ! -x "$VENV/bin/python" ] || hdr_py="$VENV/bin/python"
if command -v "$hdr_py" >/dev/null && ! "$hdr_py" -c '
import os, sys, sysconfig
sys.exit(0 if os.path.isfile(os.path.join(sysconfig.get_paths()["include"], "Python.h")) else 1)
' 2>/dev/null; then
  ver=$("$hdr_py" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
  packages+=(python3-dev "python$ver-dev")
fi
if [ "$make_venv" = 1 ]; then
  if ! command -v "$PYTHON" >/dev/null; then
    [ "$PYTHON" != python3 ] || packages+=(python3 python3-venv)  # a bare image
  elif ! "$PYTHON" -c 'import venv, ensurepip' 2>/dev/null; then
    # Debian and Ubuntu ship ensurepip apart from Python: python3-venv (python3.X-venv)
    ver=$("$PYTHON" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
    packages+=(python3-venv "python$ver-venv")
  fi
fi
if [ "${GWTN_APT:-1}" = 0 ]; then
  say "GWTN_APT=0: not installing system packages"
elif command -v apt-get >/dev/null && command -v dpkg-query >/dev/null; then
  missing=()
  for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    sudo=()
    if [ "$(id -u)" != 0 ]; then
      command -v sudo >/dev/null || fail "need root or sudo to install ${missing[*]} (or GWTN_APT=0 to skip)"
      sudo=(sudo)
    fi
    say "apt-get install ${missing[*]}"
    # (sudo drops the environment: the variable goes through env)
    apt=(${sudo[@]+"${sudo[@]}"} env DEBIAN_FRONTEND=noninteractive apt-get)
    "${apt[@]}" update -qq
    # python3.X-venv is not a package name on every release: install what the index knows.
    known=()
    for p in "${missing[@]}"; do
      apt-cache show "$p" >/dev/null 2>&1 && known+=("$p")
    done
    [ ${#known[@]} -eq 0 ] || "${apt[@]}" install -y -qq "${known[@]}" >/dev/null
  fi
else
  say "no apt-get: install Fashion-MNIST, the KJV Bible and SLURM yourself if you need them (docs/setup.md)"
fi

# --- 2. the environment
if [ -n "$active" ]; then
  py="$active/bin/python"
  [ -x "$py" ] || fail "the active environment $active has no bin/python"
  if [ ! -e "$VENV" ]; then
    ln -s "$active" "$VENV"
  elif [ "$(cd "$VENV" && pwd -P)" != "$(cd "$active" && pwd -P)" ]; then
    fail "$VENV exists and is not the active environment $active; remove it or deactivate"
  fi
  say "installing into the active environment $active ($VENV links to it)"
else
  if [ "$make_venv" = 1 ]; then
    command -v "$PYTHON" >/dev/null \
      || fail "no $PYTHON on PATH; install Python >= 3.10 or set PYTHON=/path/to/python"
    "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 10))' \
      || fail "$PYTHON is Python $("$PYTHON" -c 'import platform; print(platform.python_version())'); gwtn_dist needs >= 3.10 (set PYTHON=...)"
    "$PYTHON" -c 'import venv, ensurepip' 2>/dev/null \
      || fail "$PYTHON cannot make a venv (Debian/Ubuntu: apt-get install python3-venv)"
    # A base Python that already has a torch in range (a container's CUDA build) lends it to the
    # venv instead of a second download.
    flags=()
    if "$PYTHON" -c 'import torch' 2>/dev/null; then flags=(--system-site-packages); fi
    say "making $VENV from $(command -v "$PYTHON") ${flags[*]+"${flags[*]}"}"
    "$PYTHON" -m venv ${flags[@]+"${flags[@]}"} "$VENV"
  fi
  py="$VENV/bin/python"
fi
pip=("$py" -m pip install -q --progress-bar off)
# Debian 12's venv seeds pip 23.0 and setuptools 66: too old for an editable install of our
# package_dir mapping (gwtn_dist.kernels -> kernels/) through PEP 660, and for building a wheel
# without the `wheel` package (tests/test_packaging.py).
"$py" - <<'EOF' || "${pip[@]}" --upgrade "pip>=24" "setuptools>=70.1"
import sys
from importlib.metadata import version
major = lambda name: int(version(name).split(".")[0])
try:
    sys.exit(0 if major("pip") >= 24 and tuple(map(int, version("setuptools").split(".")[:2])) >= (70, 1) else 1)
except Exception:
    sys.exit(1)
EOF

# --- 3. torch
range=$(sed -n 's/.*"torch\([<>=!~][^"]*\)".*/\1/p' setup.py | head -1)
# What is there: "none", "old" (outside the range), "cpu" or "cuda" (a build within it).
have=$("$py" - "$range" <<'EOF'
import sys
try:
    import torch
    from pip._vendor.packaging.specifiers import SpecifierSet
except Exception:
    print("none"); sys.exit()
if not SpecifierSet(sys.argv[1]).contains(torch.__version__.split("+")[0]):
    print("old")
else:
    print("cuda" if torch.version.cuda else "cpu")
EOF
)
cpu_index=0
case "$TORCH_INDEX_URL" in */cpu|*/cpu/) cpu_index=1 ;; esac
torch_now() { "$py" -c 'import torch; print(torch.__version__)'; }
if [ "$have" = cpu ] && [ -n "$gpu" ] && [ "$cpu_index" = 0 ]; then
  # A CPU build on a GPU machine: the GPU check would only say "no CUDA GPU", hiding why.
  [ -n "$TORCH_INDEX_URL" ] || fail "this machine has $gpu (nvidia-smi: CUDA ${driver_cuda:-?}) but torch $(torch_now) is a CPU build: run TORCH_INDEX_URL=$(cuda_index_hint) ./setup.sh (your driver's CUDA version, or an older one torch is built for)"
  say "torch $(torch_now) is a CPU build on a machine with $gpu: replacing it with $TORCH_SPEC from $TORCH_INDEX_URL"
  "$py" -m pip uninstall -q -y torch
  have=none
fi
if [ "$have" = cpu ] || [ "$have" = cuda ]; then
  say "keeping torch $(torch_now) (within $range)"
else
  say "installing $TORCH_SPEC${TORCH_INDEX_URL:+ from $TORCH_INDEX_URL}"
  "${pip[@]}" "$TORCH_SPEC" ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"}
fi
if [ -n "$gpu" ] && [ "$cpu_index" = 0 ] \
    && ! "$py" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
  fail "torch $(torch_now) (CUDA $("$py" -c 'import torch; print(torch.version.cuda)')) cannot use $gpu (nvidia-smi: CUDA ${driver_cuda:-?}): remove $VENV and run TORCH_INDEX_URL=$(cuda_index_hint) ./setup.sh (your driver's CUDA version, or an older one torch is built for)"
fi
# triton: a CUDA build of torch requires the triton it was built with (installed with it, or
# there with the torch kept); nothing here installs another. A CPU build has none, and the
# kernel tests run in Triton's CPU interpreter: TRITON_SPEC then.
if "$py" -c 'import sys, torch; sys.exit(0 if torch.version.cuda else 1)'; then
  "$py" -c 'import triton' 2>/dev/null \
    || say "warning: torch $(torch_now) came without triton: the fused imitation kernels cannot run (imitate.loss_backend auto uses the reference)"
elif ! "$py" -c 'import triton' 2>/dev/null; then
  say "installing $TRITON_SPEC (Triton's CPU interpreter, for the kernel tests)"
  "${pip[@]}" "$TRITON_SPEC"
fi

# --- 4. gwtn_dist (again only when setup.py changed or another checkout was installed there)
stamp="$VENV/.gwtn-setup"
want="$(pwd -P) $(cat setup.py ${CONSTRAINTS:+"$CONSTRAINTS"} | sha256sum | cut -d' ' -f1)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && "$VENV/bin/gwtn" --version >/dev/null 2>&1; then
  say "gwtn_dist is installed from here (editable)"
else
  say "pip install -e .[test]${CONSTRAINTS:+ -c $CONSTRAINTS}"
  "${pip[@]}" -e ".[test]" ${CONSTRAINTS:+-c "$CONSTRAINTS"}
  "$VENV/bin/gwtn" --version >/dev/null || fail "gwtn did not install"
  echo "$want" > "$stamp"
fi
say "done: $VENV/bin/gwtn run configs/fmnist_resnet.yaml   $VENV/bin/python -m pytest -q"
