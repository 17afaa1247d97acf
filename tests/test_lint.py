"""`ruff check .` sees every Python file of the packages (no folder silently excluded)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

from tests.conftest import REPO


def test_ruff_checks_every_package_file():
    # The ruff of this interpreter's environment: the suite may run as .venv/bin/python -m pytest
    # without the venv on PATH.
    assert importlib.util.find_spec("ruff"), "ruff is a test dependency: ./setup.sh"
    proc = subprocess.run([sys.executable, "-m", "ruff", "check", "--show-files", "."], cwd=REPO,
                          capture_output=True,
                          text=True, timeout=120, check=True)
    seen = {line.strip() for line in proc.stdout.splitlines()}
    ours = [p for folder in ("gwtn_dist", "kernels", "tests", "benchmarks")
            for p in (REPO / folder).rglob("*.py") if "__pycache__" not in p.parts]
    missing = [str(p.relative_to(REPO)) for p in ours if str(p.resolve()) not in seen]
    assert not missing, f"ruff skips: {missing}"
