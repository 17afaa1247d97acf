"""An installed (non-editable) copy: kernels/ ships as gwtn_dist.kernels, never as `kernels`."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

from tests.conftest import REPO

CHECK = """
import importlib.util, pathlib, sys
import gwtn_dist, gwtn_dist.kernels
from gwtn_dist.kernels import imitation_mse, select_imitation_mse
from gwtn_dist.kernels.bench import imitation_bench
site = pathlib.Path(sys.argv[1]).resolve()
assert pathlib.Path(gwtn_dist.kernels.__file__).resolve().is_relative_to(site), gwtn_dist.kernels.__file__
assert not (site / "kernels").exists(), "a top-level kernels package was installed"
print("ok")
"""


def test_wheel_installs_kernels_under_gwtn_dist(tmp_path):
    # Build from a copy of the sources so the build leaves nothing in the checkout.
    src, wheels, site = tmp_path / "src", tmp_path / "wheels", tmp_path / "site"
    skip = shutil.ignore_patterns("__pycache__", "*.egg-info")
    for folder in ("gwtn_dist", "kernels"):
        shutil.copytree(REPO / folder, src / folder, ignore=skip)
    shutil.copy(REPO / "setup.py", src / "setup.py")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps",
                    "--no-build-isolation", "-w", str(wheels), str(src)],
                   check=True, capture_output=True, timeout=300)
    (wheel,) = wheels.glob("gwtn_dist-*.whl")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target",
                    str(site), str(wheel)], check=True, capture_output=True, timeout=300)
    env = {**os.environ, "PYTHONPATH": str(site)}
    proc = subprocess.run([sys.executable, "-c", CHECK, str(site)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr
