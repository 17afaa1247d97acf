"""./setup.sh's decisions about torch, triton and Triton's compilers, on a machine without a GPU.

A fake ``nvidia-smi`` on PATH plays the GPU; the environment is an "active venv" whose python is
this interpreter with a stand-in ``torch``, ``triton`` and ``pip`` first on its path: torch's
build and whether it sees the GPU come from a state file, and pip only records what it was asked
to do (installing a torch from a CUDA index turns the stand-in into that build, with its triton).
Nothing is downloaded; each run takes about a second.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CU130 = "https://download.pytorch.org/whl/cu130"

FAKE_TORCH = """
import json, os, types
_s = json.load(open(os.environ["FAKE_STATE"]))
if _s["torch"] is None:
    raise ImportError("no torch")
__version__ = _s["torch"]
version = types.SimpleNamespace(cuda=_s["cuda"])
cuda = types.SimpleNamespace(is_available=lambda: bool(_s["cuda"]) and _s["sees_gpu"])
"""
FAKE_TRITON = """
import json, os
if not json.load(open(os.environ["FAKE_STATE"]))["triton"]:
    raise ImportError("no triton")
"""
FAKE_PIP_MAIN = """
import json, os, sys
args = sys.argv[1:]
with open(os.environ["FAKE_PIP_LOG"], "a") as log:
    log.write(" ".join(args) + "\\n")
path = os.environ["FAKE_STATE"]
s = json.load(open(path))
if args[0] == "uninstall" and "torch" in args:
    s.update(torch=None, cuda=None)
elif args[0] == "install":
    for a in args:
        if a.startswith("torch=="):
            index = args[args.index("--index-url") + 1] if "--index-url" in args else ""
            cuda = "13.0" if "cu130" in index else None
            s.update(torch=a[7:] + ("+cu130" if cuda else "+cpu"), cuda=cuda)
            s["triton"] = s["triton"] or bool(cuda)  # a CUDA build brings its triton
        if a.startswith("triton=="):
            s["triton"] = True
json.dump(s, open(path, "w"))
"""
FAKE_SPECIFIERS = """
class SpecifierSet:  # enough for ">=2.13,<3"
    def __init__(self, spec):
        self.parts = [p.strip() for p in spec.split(",") if p.strip()]
    def contains(self, version):
        v = tuple(int(x) for x in version.split(".")[:2])
        for p in self.parts:
            op = p.rstrip("0123456789.")
            w = tuple(int(x) for x in p[len(op):].split("."))[:2]
            w += (0,) * (2 - len(w))
            if not {">=": v >= w, "<": v < w, ">": v > w, "<=": v <= w, "==": v == w}[op]:
                return False
        return True
"""
NVIDIA_SMI = """#!/bin/sh
case "$*" in
  -L) echo "GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-0)" ;;
  *query-gpu*) echo "NVIDIA H100 80GB HBM3" ;;
  *) echo "| NVIDIA-SMI 580.159.04   Driver Version: 580.159.04   CUDA Version: 13.0     |" ;;
esac
"""


def _write(path: Path, text: str, mode: int = 0o644) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(mode)


def run_setup(tmp_path: Path, *, gpu: bool, torch: str | None, cuda: str | None = None,
              sees_gpu: bool = True, triton: bool = False, index: str = "",
              path_tools: list[str] | None = None, apt: bool = False):
    """./setup.sh (copied with setup.py and constraints.txt) in a fake environment; returns
    (completed process, pip calls, apt-get installs, final state)."""
    work = tmp_path / "repo"
    work.mkdir()
    for name in ("setup.sh", "setup.py", "constraints.txt"):
        shutil.copy2(REPO / name, work / name)
    site, env_dir, bin_dir = tmp_path / "site", tmp_path / "env", tmp_path / "bin"
    _write(site / "torch" / "__init__.py", FAKE_TORCH)
    _write(site / "triton" / "__init__.py", FAKE_TRITON)
    _write(site / "pip" / "__init__.py", "")
    _write(site / "pip" / "__main__.py", FAKE_PIP_MAIN)
    _write(site / "pip" / "_vendor" / "__init__.py", "")
    _write(site / "pip" / "_vendor" / "packaging" / "__init__.py", "")
    _write(site / "pip" / "_vendor" / "packaging" / "specifiers.py", FAKE_SPECIFIERS)
    _write(env_dir / "bin" / "python", f'#!/bin/sh\nPYTHONPATH={site} exec {sys.executable} "$@"\n',
           0o755)
    _write(env_dir / "bin" / "gwtn", "#!/bin/sh\necho gwtn 0.1.0\n", 0o755)
    state = tmp_path / "state.json"
    state.write_text(json.dumps({"torch": torch, "cuda": cuda, "sees_gpu": sees_gpu,
                                 "triton": triton}))
    if gpu:
        _write(bin_dir / "nvidia-smi", NVIDIA_SMI, 0o755)
    path = f"{bin_dir}:{os.environ['PATH']}"
    if path_tools is not None:  # only these tools (e.g. no C compiler), plus fake apt
        tools = tmp_path / "tools"
        tools.mkdir()
        for t in path_tools:
            (tools / t).symlink_to(shutil.which(t))
        path = f"{bin_dir}:{tools}"
    if apt:
        _write(bin_dir / "apt-get", '#!/bin/sh\necho "$*" >> "$FAKE_APT_LOG"\n', 0o755)
        _write(bin_dir / "apt-cache", "#!/bin/sh\nexit 0\n", 0o755)
        _write(bin_dir / "dpkg-query", "#!/bin/sh\nexit 1\n", 0o755)  # nothing installed
    env = {"PATH": path, "HOME": str(tmp_path), "VIRTUAL_ENV": str(env_dir),
           "FAKE_STATE": str(state), "FAKE_PIP_LOG": str(tmp_path / "pip.log"),
           "FAKE_APT_LOG": str(tmp_path / "apt.log"), "GWTN_APT": "1" if apt else "0"}
    if index:
        env["TORCH_INDEX_URL"] = index
    proc = subprocess.run(["bash", str(work / "setup.sh")], capture_output=True, text=True,
                          env=env, timeout=120, check=False)
    pip_log = tmp_path / "pip.log"
    apt_log = tmp_path / "apt.log"
    return (proc, pip_log.read_text().splitlines() if pip_log.exists() else [],
            apt_log.read_text().splitlines() if apt_log.exists() else [],
            json.loads(state.read_text()))


def _torch_installs(calls):
    return [c for c in calls if c.startswith("install") and " torch==" in f" {c}"]


def test_a_cpu_torch_on_a_gpu_machine_stops_with_the_index_to_pass(tmp_path):
    proc, calls, _, _ = run_setup(tmp_path, gpu=True, torch="2.13.0+cpu", triton=True)
    assert proc.returncode == 1
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1 and "NVIDIA H100" in err[0] and "is a CPU build" in err[0], err
    assert f"TORCH_INDEX_URL={CU130} ./setup.sh" in err[0]
    assert not _torch_installs(calls) and not any("uninstall" in c for c in calls)


def test_a_cpu_torch_on_a_gpu_machine_is_replaced_from_the_index_given(tmp_path):
    proc, calls, _, state = run_setup(tmp_path, gpu=True, torch="2.13.0+cpu", index=CU130)
    assert proc.returncode == 0, proc.stderr
    assert calls.index("uninstall -q -y torch") < calls.index(
        next(c for c in calls if "torch==2.13.0" in c))
    (install,) = _torch_installs(calls)
    assert f"--index-url {CU130}" in install
    # triton came with the CUDA build: nothing installs another
    assert not any("triton" in c for c in calls), calls
    assert state["cuda"] == "13.0" and state["triton"]
    assert any(c.startswith("install") and "-e .[test]" in c for c in calls)


def test_a_cuda_torch_that_cannot_see_the_gpu_stops_in_one_line(tmp_path):
    proc, calls, _, _ = run_setup(tmp_path, gpu=True, torch="2.13.0+cu130", cuda="13.0",
                                  sees_gpu=False, triton=True)
    assert proc.returncode == 1
    (line,) = proc.stderr.strip().splitlines()
    assert "cannot use NVIDIA H100" in line and f"TORCH_INDEX_URL={CU130}" in line
    assert not _torch_installs(calls)


def test_without_a_gpu_a_cpu_torch_is_kept_and_gets_the_pinned_triton(tmp_path):
    proc, calls, _, state = run_setup(tmp_path, gpu=False, torch="2.13.0+cpu")
    assert proc.returncode == 0, proc.stderr
    assert "keeping torch 2.13.0+cpu" in proc.stdout
    assert not _torch_installs(calls) and "uninstall -q -y torch" not in calls
    (triton,) = [c for c in calls if "triton" in c]
    assert triton.split()[-1] == "triton==3.9.0" and state["triton"]


def test_a_cpu_index_on_a_gpu_machine_is_respected(tmp_path):
    proc, calls, _, _ = run_setup(tmp_path, gpu=True, torch="2.13.0+cpu",
                                  index="https://download.pytorch.org/whl/cpu", triton=True)
    assert proc.returncode == 0, proc.stderr
    assert not _torch_installs(calls) and "uninstall -q -y torch" not in calls


@pytest.mark.skipif(os.geteuid() != 0, reason="the apt step runs as root (or with sudo)")
def test_the_compilers_triton_and_torch_compile_need_are_installed_when_missing(tmp_path):
    tools = ["bash", "sh", "sed", "awk", "head", "cat", "sha256sum", "cut", "ln", "dirname",
             "id", "env", "tr", "grep", "mkdir", "rm"]  # no gcc, g++, clang
    for restricted in (True, False):
        tmp = tmp_path / str(restricted)
        tmp.mkdir()
        proc, _, apt, _ = run_setup(tmp, gpu=False, torch="2.13.0+cpu", triton=True,
                                    path_tools=tools if restricted else None, apt=True)
        assert proc.returncode == 0, proc.stderr
        (install,) = [line for line in apt if line.startswith("install")]
        wanted = set(install.split())
        assert "dataset-fashion-mnist" in wanted  # the usual packages, as before
        assert ({"gcc", "g++"} <= wanted) is restricted, install
        assert "python3-dev" not in wanted  # this Python has its headers


def test_setup_py_leaves_triton_to_torch():
    text = (REPO / "setup.py").read_text()
    requires = text[text.index("install_requires"):text.index("extras_require")]
    assert '"triton' not in requires
