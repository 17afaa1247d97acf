"""`ruff check .` sees every Python file of the packages (no folder silently excluded)."""

from __future__ import annotations

import shutil
import subprocess

from tests.conftest import REPO


def test_ruff_checks_every_package_file():
    ruff = shutil.which("ruff")
    assert ruff is not None, "ruff is a test dependency: pip install -e '.[test]'"
    proc = subprocess.run([ruff, "check", "--show-files", "."], cwd=REPO, capture_output=True,
                          text=True, timeout=120, check=True)
    seen = {line.strip() for line in proc.stdout.splitlines()}
    ours = [p for folder in ("gwtn_dist", "kernels", "tests", "benchmarks")
            for p in (REPO / folder).rglob("*.py") if "__pycache__" not in p.parts]
    missing = [str(p.relative_to(REPO)) for p in ours if str(p.resolve()) not in seen]
    assert not missing, f"ruff skips: {missing}"
