"""Timing and peak-memory helpers for the kernel benchmarks (CUDA events on GPU, clock on CPU)."""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

# Peak DRAM bandwidth (GB/s) by GPU name fragment, most specific first; None when unknown.
_PEAK_BANDWIDTH_GBPS = [
    ("H200", 4800.0),
    ("H100 PCIe", 2000.0),
    ("H100 NVL", 3900.0),
    ("H100", 3350.0),  # SXM
    ("A100-SXM4-80GB", 2039.0),
    ("A100 80GB PCIe", 1935.0),
    ("A100", 1555.0),  # 40 GB
    ("L40S", 864.0),
    ("A10G", 600.0),
    ("RTX 4090", 1008.0),
]


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return "CPU"


def peak_bandwidth_gbps(device: torch.device) -> float | None:
    """Vendor peak memory bandwidth of the GPU, where the name is known."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for fragment, gbps in _PEAK_BANDWIDTH_GBPS:
        if fragment in name:
            return gbps
    return None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_ms(
    fn: Callable[[Any], Any],
    device: torch.device,
    setup: Callable[[], Any] | None = None,
    reps: int = 20,
    warmup: int = 3,
) -> float:
    """Median wall time of ``fn(setup())`` in ms; ``setup`` runs untimed before every call."""
    times = []
    for i in range(warmup + reps):
        state = setup() if setup is not None else None
        _sync(device)
        if device.type == "cuda":
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            fn(state)
            end.record()
            end.synchronize()
            elapsed = start.elapsed_time(end)
        else:
            t0 = time.perf_counter()
            fn(state)
            elapsed = (time.perf_counter() - t0) * 1e3
        if i >= warmup:
            times.append(elapsed)
    return statistics.median(times)


def peak_extra_mb(
    fn: Callable[[Any], Any], device: torch.device, setup: Callable[[], Any] | None = None
) -> float:
    """Peak memory of one ``fn(setup())`` above what was allocated before it (CUDA only, MiB).

    Whatever ``fn`` leaves alive (e.g. ``.grad`` tensors) counts. NaN on CPU.
    """
    if device.type != "cuda":
        return math.nan
    state = setup() if setup is not None else None
    _sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    out = fn(state)
    _sync(device)
    peak = torch.cuda.max_memory_allocated(device) - base
    del out
    return peak / 2**20
