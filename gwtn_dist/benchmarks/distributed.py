"""Teacher memory per rank and imitation step time at several world sizes, sharded vs replicated.

    python -m gwtn_dist.benchmarks.distributed --out runs/bench-dist [--config C] \
        [--world-sizes 1 2 4]

For each world size and teacher placement it launches ``gwtn imitate`` under torchrun against
one saved wide net (random weights: the timing does not depend on them), with the global batch
of the config, and reads the teacher's parameter bytes per rank and the training time per step
from ``imitate/stage.json``. Prints a table and writes ``dist_bench.csv`` and ``.md``.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

from .. import checkpoint
from ..config import load_config
from ..data.fashion_mnist import write_fashion_mnist
from ..models.family import build_wide, shape_meta
from .data import machine


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def measure(config: str, shards: Path, out: Path, world: int, mode: str, steps: int) -> dict:
    """One launch of the imitation stage; returns its row of the table."""
    run_dir = out / f"ws{world}-{mode}"
    cfg = load_config(config)
    wide = build_wide(cfg.model)
    checkpoint.save_weights(wide, run_dir / "wide" / "model.pt",
                            {"stage": "wide", **shape_meta(cfg.model, wide=True)})
    (run_dir / "wide" / "DONE").write_text("")
    (run_dir / "wide" / "stage.json").write_text("{}")
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={world}",
               f"--master-port={_free_port()}", "-m", "gwtn_dist", "-q", "imitate", config,
               f"run_dir={run_dir}", f"data.shards={shards}", "progress=false", "threads=1",
               f"imitate.steps_per_point={steps}", "dist.engine=deepspeed",
               f"dist.teacher={mode}", "eval_every=0", "checkpoint.every=100000"]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1",
           "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(command)} failed:\n{proc.stderr[-3000:]}")
    record = json.loads((run_dir / "imitate" / "stage.json").read_text())
    teacher = record["teacher"]
    return {"world_size": world, "teacher": teacher["mode"],
            "teacher_bytes_per_rank": teacher["param_bytes_per_rank"],
            "teacher_bytes_total": teacher["param_bytes_total"],
            "share_per_rank": teacher["param_bytes_per_rank"] / teacher["param_bytes_total"],
            "step_ms": 1000 * record["wall_s"] / record["steps"],
            "global_batch": cfg.data.batch_size}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="folder for the runs and the tables")
    parser.add_argument("--config", default="configs/fmnist_resnet.yaml")
    parser.add_argument("--shards", help="shard folder (default: the config's, written from "
                                         "Debian's Fashion-MNIST if missing)")
    parser.add_argument("--world-sizes", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--steps-per-point", type=int, default=10)
    args = parser.parse_args(argv)
    out = Path(args.out)
    shards = Path(args.shards or load_config(args.config).data.shards)
    if not (shards / "index.json").is_file():
        write_fashion_mnist(shards, None)
    rows = []
    for world in args.world_sizes:
        for mode in (["replicate"] if world == 1 else ["replicate", "shard"]):
            rows.append(measure(args.config, shards, out, world, mode, args.steps_per_point))
            print(rows[-1], flush=True)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "dist_bench.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    lines = [(f"Machine: {machine()}. Imitation stage ({args.config}), global batch "
              f"{rows[0]['global_batch']}, {args.steps_per_point} steps per point; step time "
              f"is training only."), "",
             "| world size | teacher | teacher bytes per rank | of total | step (ms) |",
             "|---:|---|---:|---:|---:|"]
    lines += [f"| {r['world_size']} | {r['teacher']} | {r['teacher_bytes_per_rank']:,} | "
              f"{r['share_per_rank']:.0%} | {r['step_ms']:.0f} |" for r in rows]
    (out / "dist_bench.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
