"""``gwtn bench step|imitate CONFIG``: what a training step costs, side by side in one process.

``step``: the framework's training step (a ``scratch`` baseline of the config run through the
one training loop: data stream, augmentation, engine, schedule, metrics, checkpoints) against
a bare PyTorch loop of the same net, batch, memory format and optimizer on one batch kept in
memory. The ratio is the framework's steady-state overhead (its first logging window, which
holds the warm-up a run pays once, is reported apart, as ``framework_warmup_s``; the bare loop
leaves as many steps untimed); the breakdown of the framework's sampled steps
(``profiling``) says where it goes.

``imitate``: one imitation step at the top imitation point (the costliest: the whole trunk)
with each loss backend — ``reference`` (plain PyTorch), ``compiled`` (``torch.compile`` of the
reference) and ``triton`` (the fused kernel, where it can run) — against a plain thin-net
training step plus one teacher forward at the same batch: the cost an imitation step cannot go
below. Teacher and student are freshly initialised (the time does not depend on the weights).

Both run ``--rounds`` interleaved rounds of ``--steps`` steps and report medians, so a machine
that slows down in between affects both sides alike (``step`` leaves its round 0 out of the
median when there are later rounds); they print a table and write CSV.
Absolute times describe only the machine they ran on; the ratios are the result.
"""

from __future__ import annotations

import csv
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from ..config import Config, ConfigError, with_overrides
from ..distributed.runtime import Runtime
from ..kernels import select_imitation_mse
from ..models.family import build_thin, build_wide, family_for
from ..optim import build_optimizer
from ..stages.common import place, resolve_device


def _timed(step: Callable[[], None], steps: int, device: torch.device, warmup: int = 1) -> float:
    """Seconds per step over ``steps`` steps, after ``warmup`` untimed steps."""
    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / steps


def _check_images(cfg: Config, command: str) -> None:
    """Both benchmarks feed synthetic 28×28 images: refuse, in one line, a family whose nets
    take something else."""
    family = family_for(cfg.model)
    if not family.takes_images:
        raise ConfigError(f"gwtn bench {command}: needs a family whose nets take images; "
                          f"model.family {family.name!r} does not (yet)")


def _batch(cfg: Config, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """A random (B, C, 28, 28) batch and (B,) labels, in the run's memory format."""
    b, m = cfg.data.batch_size, cfg.model
    x = torch.randn(b, m.in_channels, 28, 28, device=device)
    if cfg.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x, torch.randint(0, m.num_classes, (b,), device=device)


def _window(steps: int) -> int:
    """Steps in one logging window of the framework's run: its first is left untimed, and the
    bare loop leaves as many untimed."""
    return min(10, steps)


def _bare_step(rt: Runtime, cfg: Config, device: torch.device) -> Callable[[], None]:
    """One step of a bare PyTorch loop: the thin net, cross-entropy, the baseline optimizer."""
    net = place(rt, build_thin(cfg.model), cfg, device).train()
    opt = build_optimizer([{"params": list(net.parameters())}], cfg.baseline.optim)
    x, y = _batch(cfg, device)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(net(x), y).backward()
        opt.step()

    return step


def _framework_seconds(rt: Runtime, cfg: Config, steps: int, folder: Path
                       ) -> tuple[float, float, float, dict]:
    """Seconds per step of the training loop in steady state, seconds of its first logging
    window, CPU seconds per step of making the batches (steady state; the prefetch thread's),
    and the breakdown of its sampled steps.

    The loop logs a record every ``log_every`` = ``_window(steps)`` steps (a window) and runs
    one window more than the ``steps`` rounded up to whole windows, since only whole windows
    are logged. The first window holds the warm-up (the first batches, the first backward), which
    a long run pays once: its seconds are reported apart. The steady state is the mean step
    time of the other windows, from ``metrics.jsonl``, as a run logs it.
    """
    from ..spec import resolve
    from ..stages.finetune import train_thin

    window = _window(steps)
    windows = -(-steps // window) + 1  # the steady windows, rounded up, plus the first
    cfg = with_overrides(cfg, {"eval_every": 0, "checkpoint.every": 10**9, "progress": False,
                               "profile.sample_every": 5, "log_every": window})
    record = train_thin(rt, resolve(cfg), folder, "bench", init=None, teacher=None, kd_steps=0,
                        label_steps=windows * window, optim=cfg.baseline.optim)
    with open(folder / "bench" / "metrics.jsonl") as f:
        timed = [r for r in map(json.loads, f) if "step_s" in r]  # one per window
    first, steady = timed[0], timed[1:]
    seconds = sum(r["step_s"] for r in steady) / len(steady)
    data_cpu = sum(r["data_cpu_s"] for r in steady) / len(steady)
    return (seconds, first["step_s"] * window, data_cpu,
            record["phases"][0].get("breakdown", [{}])[0])


def bench_step(rt: Runtime, cfg: Config, steps: int, rounds: int, out: Path) -> list[dict]:
    """Bare loop vs the framework, ``rounds`` interleaved rounds; rows per round + the median."""
    _check_images(cfg, "step")
    device = resolve_device(rt, cfg)
    rows = []
    for r in range(rounds):
        # Both sides leave a logging window untimed: the framework its first window (see
        # _framework_seconds), the bare loop as many steps.
        bare = _timed(_bare_step(rt, cfg, device), steps, device, warmup=_window(steps))
        with tempfile.TemporaryDirectory() as tmp:
            framework, warmup, data_cpu, breakdown = _framework_seconds(rt, cfg, steps,
                                                                        Path(tmp))
        data = breakdown.get("regions", {}).get("data", 0.0)
        rows.append({"round": r, "bare_ms": bare * 1e3, "framework_ms": framework * 1e3,
                     "ratio": framework / bare, "framework_data_ms": data,
                     "data_cpu_ms": data_cpu * 1e3, "framework_warmup_s": warmup})
    # Round 0 is shown but left out of the median when there are later rounds: on a 2-core
    # CPU its bare loop ran 20-50% slower than in later rounds in 9 of 11 runs (cause not
    # found; an untimed warm-up round before it did not help), which flattered the framework.
    steady = rows[1:] or rows
    rows.append({"round": "median", **{k: statistics.median(row[k] for row in steady)
                                       for k in ("bare_ms", "framework_ms", "ratio",
                                                 "framework_data_ms", "data_cpu_ms",
                                                 "framework_warmup_s")}})
    _write_csv(rows, out / "bench_step.csv")
    return rows


def _imitation_step(rt: Runtime, cfg: Config, device: torch.device,
                    backend: str) -> Callable[[], None]:
    """One imitation step at the top point: teacher forward (no grad), thin forward to the
    point, the imitation MSE (backend), backward, SGD step."""
    thin = place(rt, build_thin(cfg.model), cfg, device).train()
    wide = place(rt, build_wide(cfg.model), cfg, device).eval()
    end = family_for(cfg.model).point_index(thin, "layer" + str(len(cfg.model.blocks)))
    if backend == "compiled":
        mse = torch.compile(select_imitation_mse("reference", device))
    else:
        mse = select_imitation_mse(backend, device)
    opt = build_optimizer([{"params": list(thin.parameters())}], cfg.imitate.optim)
    x, _ = _batch(cfg, device)

    def step() -> None:
        with torch.no_grad():
            target = wide(x, upto=end)  # (B, C, H', W'): the wide net's output at the point
        opt.zero_grad(set_to_none=True)
        mse(thin(x, upto=end), target).backward()
        opt.step()

    return step


def _floor_step(rt: Runtime, cfg: Config, device: torch.device) -> Callable[[], None]:
    """A plain thin-net training step plus one whole teacher forward at the same batch."""
    bare = _bare_step(rt, cfg, device)
    wide = place(rt, build_wide(cfg.model), cfg, device).eval()
    x, _ = _batch(cfg, device)

    def step() -> None:
        with torch.no_grad():
            wide(x)
        bare()

    return step


def imitate_backends(device: torch.device) -> list[str]:
    """The loss backends that can run here (the fused kernel needs CUDA or the interpreter)."""
    backends = ["reference", "compiled"]
    try:
        select_imitation_mse("triton", device)
        backends.append("triton")
    except RuntimeError:
        pass
    return backends


def bench_imitate(rt: Runtime, cfg: Config, steps: int, rounds: int, out: Path) -> list[dict]:
    """Imitation steps per backend vs the floor, ``rounds`` interleaved rounds; medians."""
    _check_images(cfg, "imitate")
    device = resolve_device(rt, cfg)
    backends = imitate_backends(device)
    runs = {"floor": _floor_step(rt, cfg, device),
            **{b: _imitation_step(rt, cfg, device, b) for b in backends}}
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(rounds):
        for name, step in runs.items():
            times[name].append(_timed(step, steps, device))
    floor = statistics.median(times["floor"])
    rows = [{"step": name, "ms": statistics.median(t) * 1e3,
             "ratio_to_floor": statistics.median(t) / floor} for name, t in times.items()]
    _write_csv(rows, out / "bench_imitate.csv")
    return rows


def _write_csv(rows: list[dict], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def table(rows: list[dict]) -> str:
    """The rows as a Markdown table (floats to 3 decimals)."""
    keys = list(rows[0])
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    for row in rows:
        lines.append("| " + " | ".join(f"{v:.3f}" if isinstance(v, float) else str(v)
                                       for v in row.values()) + " |")
    return "\n".join(lines)
