"""Fault run by hand: SIGKILL a 2-rank run at random moments, resume it each time, and check
that it ends with the weights of an uninterrupted run.

    python3 -m tests.fault_run --kills 20 --out runs/fault

The run is all three stages and the scratch baseline of ``configs/tiny_cpu.yaml`` on 2 ranks
(torchrun, DeepSpeed ZeRO-3 wide stage, sharded teacher) on the tests' synthetic data,
lengthened so that 20 kills fit into it. Half of the kills are timed at random; the other half
wait for a checkpoint write to be under way (a temporary file in a stage folder, or a DeepSpeed
tag folder that is still being filled) and kill inside it. Each kill is armed 5–45 s after a
start, so the kills spread over the stages. Every kill takes the whole job down
(torchrun and both ranks) with SIGKILL; the next start is the same command with
``resume=true``. At the end every stage's ``model.pt`` is compared tensor by tensor with the
reference run's, and ``stage.json``'s resume records are counted. Prints one line per kill and
a verdict; exit 0 when every tensor is equal and the kills asked for were made.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from gwtn_dist import checkpoint
from gwtn_dist.data.fashion_mnist import write_fashion_mnist
from tests.conftest import REPO, make_idx_dataset
from tests.test_distributed import env, free_port, torchrun

STAGES = ("wide", "imitate", "finetune", "scratch")
# Long enough for 20 kills (each restart costs a few seconds of start-up), with a checkpoint
# every 7 steps so that kills often land in or near a save.
LONGER = ["wide.steps=600", "imitate.steps_per_point=140", "finetune.kd_steps=100",
          "finetune.label_steps=200", "checkpoint.every=7", "dist.wide_zero_stage=3",
          "dist.teacher=shard", "eval_every=0", "progress=false", "threads=1",
          "data.train_samples=0"]


def command(shards: Path, run_dir: Path, resume: bool) -> list[str]:
    args = ["run", str(REPO / "configs" / "tiny_cpu.yaml"), f"run_dir={run_dir}",
            f"data.shards={shards}", *LONGER]
    return torchrun(2, args + (["resume=true"] if resume else []), port=free_port())


def saving(run_dir: Path) -> bool:
    """A checkpoint write is under way: a temporary file in a stage folder, or a DeepSpeed
    tag folder without its final file yet."""
    for stage in STAGES:
        folder = run_dir / stage
        if any(folder.glob(".*.tmp.*")):
            return True
        tags = folder / "deepspeed"
        if tags.is_dir() and any(d.is_dir() and not any(d.glob("*optim_states*"))
                                 for d in tags.iterdir() if d.name.startswith("phase")):
            return True
    return False


def start(cmd: list[str], log) -> subprocess.Popen:
    return subprocess.Popen(cmd, env=env(), stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)


def descendants(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True,
                         check=False).stdout
    children = [int(p) for p in out.split()]
    return children + [d for c in children for d in descendants(c)]


def kill_job(job: subprocess.Popen) -> None:
    """SIGKILL torchrun and every rank at once (torchrun starts its ranks in sessions of
    their own, so killing its process group alone would leave them running)."""
    for pid in [job.pid, *descendants(job.pid)]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    job.wait()


def weights(run_dir: Path, stage: str) -> dict[str, torch.Tensor]:
    return checkpoint.load(run_dir / stage / "model.pt")["state_dict"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kills", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("runs/fault"))
    args = ap.parse_args(argv)
    rng = random.Random(args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    shards = args.out / "shards"
    if not (shards / "index.json").is_file():
        write_fashion_mnist(shards, make_idx_dataset(args.out / "idx", train=1200, test=300),
                            progress=False)
    with open(args.out / "fault_run.log", "a") as log:
        return fault_run(args, shards, rng, log)


def fault_run(args: argparse.Namespace, shards: Path, rng: random.Random, log) -> int:
    """The reference run (once), then the faulty one; the verdict as an exit code."""
    reference = args.out / "reference"
    if not (reference / "scratch" / "DONE").is_file():
        t0 = time.monotonic()
        job = start(command(shards, reference, resume=(reference / "config.yaml").is_file()),
                    log)
        if job.wait() != 0:
            print(f"the reference run failed; see {args.out / 'fault_run.log'}")
            return 1
        print(f"reference run: {time.monotonic() - t0:.0f} s")

    faulty = args.out / "faulty"
    kills, starts, t_start = 0, 0, time.monotonic()
    while True:
        job = start(command(shards, faulty, resume=starts > 0), log)
        starts += 1
        # A moment 5–45 s after the start (start-up takes about 15 s); a kill inside a save
        # waits from then for the next checkpoint write.
        inside_save = kills % 2 == 1
        armed = time.monotonic() + rng.uniform(5.0, 45.0)
        deadline = armed + (120.0 if inside_save else 0.0)
        while job.poll() is None and kills < args.kills and time.monotonic() < deadline:
            if inside_save and time.monotonic() > armed and saving(faulty):
                break
            time.sleep(0.01)
        if job.poll() is None and kills < args.kills:
            kill_job(job)
            kills += 1
            done = [s for s in STAGES if (faulty / s / "DONE").is_file()]
            print(f"kill {kills:2d} ({'inside a save' if inside_save else 'at random'}) "
                  f"after {time.monotonic() - t_start:5.0f} s; finished stages: {done}",
                  flush=True)
            continue
        code = job.wait()
        if code != 0:
            print(f"start {starts} ended with exit code {code}; see {args.out / 'fault_run.log'}")
            return 1
        if (faulty / "scratch" / "DONE").is_file():
            break

    differing = [f"{stage}/{name}" for stage in STAGES
                 for name, tensor in weights(reference, stage).items()
                 if not torch.equal(weights(faulty, stage)[name], tensor)]
    resumes = {s: len(json.loads((faulty / s / "stage.json").read_text())["resumes"])
               for s in STAGES}
    print(f"{kills} kills, {starts} starts, resumes recorded per stage: {resumes}")
    if differing or kills < args.kills:
        print(f"FAIL: {len(differing)} tensors differ from the uninterrupted run: "
              f"{differing[:5]}")
        return 1
    print(f"PASS: every tensor of {', '.join(STAGES)} equals the uninterrupted run's")
    return 0


if __name__ == "__main__":
    sys.exit(main())
