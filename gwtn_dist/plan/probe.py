"""The resident memory a rank's process needs before any net exists, measured on this machine.

    python -m gwtn_dist.plan.probe CONFIG [key=value …] --world N

A stage process imports torch, gwtn_dist's stages and readers (and DeepSpeed, joining a process
group, when it runs on several ranks), reads its data (the training stream with its
prefetched batches, and the evaluation splits: Fashion-MNIST keeps its decoded splits in
memory), and sets up the libraries a first step wakes (torch's optimizers import its compiler
stack, the first backward starts autograd's threads and oneDNN's caches: about 200 MB on
CPU). The probe does all that in a fresh process with a net of a few parameters in place of
the real ones (one training step through the run's engine, and under DeepSpeed a ZeRO-3
frozen copy, as a sharded teacher is), and prints its peak resident memory in MiB as JSON, and
the peak before that first step (``before_step_mb``: the floor under what a stage builds and
loads before its first step, such as the teacher). On a CPU this is the floor under every stage's
peak, which a formula could not give: it is the libraries' and the allocator's. The planner runs it
for ``gwtn plan --device cpu`` and ``--check``.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys

from .memwatch import status_mb


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def measure(config: str, overrides: list[str], world: int,
            timeout_s: float = 1800) -> tuple[float, float]:
    """Peak resident MiB of a fresh probe process for ``config`` as one of ``world`` ranks:
    (before the first step, after it)."""
    env = {**os.environ, "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu"),
           "PYTHONWARNINGS": "ignore", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(_free_port()), "RANK": "0", "LOCAL_RANK": "0",
           "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1"}
    from ..config import ConfigError

    try:
        proc = subprocess.run([sys.executable, "-m", "gwtn_dist.plan.probe", config,
                               *overrides, "--world", str(world)], env=env,
                              capture_output=True, text=True, timeout=timeout_s, check=False)
    except subprocess.TimeoutExpired:
        raise ConfigError(f"the memory probe of {config} did not finish in {timeout_s:.0f} s "
                          f"(a busy machine, or DeepSpeed compiling its CPU ops)") from None
    if proc.returncode:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise ConfigError(f"the memory probe of {config} failed: {tail}")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    return float(out["before_step_mb"]), float(out["peak_mb"])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("config")
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--world", type=int, default=1)
    args = parser.parse_args(argv)
    from ..config import ConfigError

    try:
        _probe(args)
    except (ConfigError, OSError, ValueError, RuntimeError) as exc:  # bad config, data
        sys.stderr.write(f"{exc}\n")  # one line for the planner to show
        sys.exit(2)


def _probe(args: argparse.Namespace) -> None:
    import torch

    from .. import pipeline  # noqa: F401  (what a stage process imports)
    from ..config import load_config
    from ..data.datasets import train_batches
    from ..data.prefetch import Prefetcher
    from ..spec import resolve

    cfg = load_config(args.config, args.overrides)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    task = resolve(cfg).task
    device = torch.device("cpu")
    batches = train_batches(cfg, 0, 0, args.world)
    keys = ((0, s) for s in range(cfg.data.prefetch + 3))
    feed = Prefetcher(batches, keys, lambda b: task.prepare(*b, device=device),
                      cfg.data.prefetch)
    try:
        for step in range(cfg.data.prefetch + 3):
            feed.next(0, step)
    finally:
        feed.close()
    for split in task.score_splits:
        next(iter(task.eval_batches(0, 0, args.world, split)), None)
    if args.world > 1:  # the engine's library and a (one-rank) process group
        from ..distributed.engines import init_distributed

        init_distributed("gloo", 60)
    before = status_mb("VmHWM")
    _first_step(cfg, args.world)
    print(json.dumps({"before_step_mb": round(before, 1),
                      "peak_mb": round(status_mb("VmHWM"), 1)}))


def _first_step(cfg, world: int) -> None:
    """One step of a net of a few parameters through the run's engine and optimizer (and,
    on several ranks, a ZeRO-3 frozen copy of it, as a sharded teacher is held)."""
    import torch

    from ..distributed.engines import make_engine, shard_frozen
    from ..distributed.runtime import Runtime
    from ..models.family import family_for

    rt = Runtime(engine="deepspeed" if world > 1 or cfg.dist.engine == "deepspeed"
                 else "torch")
    nn = torch.nn
    if family_for(cfg.model).takes_images:  # the kernels an image net's first step wakes
        net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(),
                            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))
        x = torch.randn(2, 3, 16, 16).contiguous(memory_format=torch.channels_last)
    else:  # and a token model's
        net = nn.Sequential(nn.Linear(8, 8), nn.GELU(), nn.LayerNorm(8), nn.Linear(8, 2))
        x = torch.randn(2, 4, 8)
    engine = make_engine(rt, net, [{"params": list(net.parameters())}], cfg.wide.optim, 2,
                         zero_stage=cfg.dist.wide_zero_stage, dist_cfg=cfg.dist, micro_batch=2)
    engine.backward(torch.nn.functional.softmax(net(x), -1).square().mean())
    engine.step()
    engine.release({"net": net})
    if rt.engine == "deepspeed":
        frozen = torch.nn.Sequential(torch.nn.Linear(8, 8)).requires_grad_(False)
        with torch.no_grad():
            shard_frozen(rt, frozen, cfg.dist, 2)(torch.randn(2, 8))


if __name__ == "__main__":
    main()
