"""Shared fixtures: small MNIST-format idx data written by the tests, and shards made from it."""

from __future__ import annotations

import gzip
import os
import struct
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

# Without CUDA, Triton kernels run only in Triton's CPU interpreter, and the mode is fixed when
# triton is first imported: its own standard-library @triton.jit helpers (tl.sum, …) are decorated
# then. torch imports triton lazily (an optimizer step is enough), so a test that steps an
# optimizer before the kernel tests would lock triton into compiled mode. Choose the interpreter
# here, before any test runs. Nothing else in the suite runs Triton kernels on CPU.
# (A test module that imports ``tests.conftest`` loads this file a second time, possibly after
# triton: the mode was chosen by the first load then.)
if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
    assert "triton" not in sys.modules, "triton was imported before conftest could pick its mode"
    os.environ["TRITON_INTERPRET"] = "1"

REPO = Path(__file__).resolve().parents[1]


# Test this checkout's kernels/ as gwtn_dist.kernels, not an installed checkout's: an editable
# install maps that package to the folder it was installed from (a git worktree under test would
# otherwise run another checkout's kernels). The GPU check loads the checkout the same way.
from benchmarks.checkout import use_checkout  # after the Triton mode is chosen

use_checkout()

from gwtn_dist.data.fashion_mnist import DEBIAN_DIR, write_fashion_mnist


def write_idx(path: Path, array: np.ndarray) -> None:
    """Write a uint8 array as a gzipped idx file (the MNIST format)."""
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def make_idx_dataset(folder: Path, train: int, test: int, seed: int = 0) -> Path:
    """A learnable 28×28, 10-class dataset in Fashion-MNIST's file names.

    Each image is a 10×10 square at a random place on a noisy background; its brightness
    gives the class. Global-pooled CNNs read brightness easily (position would be hard).
    """
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for n, stem in [(train, "train"), (test, "t10k")]:
        labels = rng.integers(0, 10, n).astype(np.uint8)
        images = rng.integers(0, 40, (n, 28, 28)).astype(np.uint8)
        for i, c in enumerate(labels):
            r, col = rng.integers(0, 18, 2)
            images[i, r : r + 10, col : col + 10] = 60 + 20 * int(c)
        write_idx(folder / f"{stem}-images-idx3-ubyte.gz", images)
        write_idx(folder / f"{stem}-labels-idx1-ubyte.gz", labels)
    return folder


@pytest.fixture(scope="session")
def idx_dir(tmp_path_factory) -> Path:
    return make_idx_dataset(tmp_path_factory.mktemp("idx"), train=1200, test=300)


@pytest.fixture(scope="session")
def shard_dir(tmp_path_factory, idx_dir) -> Path:
    out = tmp_path_factory.mktemp("shards")
    write_fashion_mnist(out, idx_dir, progress=False)
    return out


@pytest.fixture(scope="session")
def real_shard_dir(tmp_path_factory) -> Path:
    """Shards of the real Fashion-MNIST from Debian's package (skipped where it is absent)."""
    if not (DEBIAN_DIR / "train-images-idx3-ubyte.gz").is_file():
        pytest.skip("Debian's dataset-fashion-mnist is not installed")
    out = tmp_path_factory.mktemp("fmnist")
    write_fashion_mnist(out, None, progress=False)
    return out


# Skips CI may take: only what needs a GPU. Anything else the README says is tested (SLURM,
# DeepSpeed, Debian's data, transformers) fails instead of skipping under CI=true (how CI runs
# the suite) or GWTN_NO_SKIP=1, so a broken install cannot turn into a green run.
ALLOWED_SKIPS = ("CUDA", "GPU")


def _strict() -> bool:
    return os.environ.get("CI") == "true" or os.environ.get("GWTN_NO_SKIP") == "1"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.skipped and _strict() and not hasattr(report, "wasxfail"):
        reason = str(report.longrepr[-1] if isinstance(report.longrepr, tuple)
                     else report.longrepr)
        if not any(word in reason for word in ALLOWED_SKIPS):
            report.outcome = "failed"
            report.longrepr = f"skipped under CI=true / GWTN_NO_SKIP=1, which allow only GPU " \
                              f"skips: {reason}"


@pytest.fixture(autouse=True)
def _two_threads():
    # The suite is sized for 2 cores; more threads only add contention between test workers.
    torch.set_num_threads(2)
    yield
