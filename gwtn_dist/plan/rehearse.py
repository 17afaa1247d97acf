"""``gwtn rehearse CONFIG``: every stage of a config at its true size, for a few steps, on a
few CPU ranks (or this machine's GPUs), each stage in its own processes, with every rank's peak
memory and the wall time recorded.

A user about to book a cluster runs it on a login node: it writes synthetic shards in the true
shapes of the config's data (``data/synthetic.py``; ``--real-data`` reads the config's own
shards), then runs ``wide``, ``imitate``, ``finetune`` and every other arm of ``arms`` in turn,
each as ``torchrun … gwtn rehearse CONFIG --stage S`` (one plain process for one rank), with the
teacher sharded (ZeRO-3, ``dist.teacher=shard``), ``--steps`` steps per phase, a micro-batch of
``--micro-batch`` samples per rank, and checkpoints at phase ends only. Each rank of each stage
writes ``OUT/memory/<stage>-rank<r>.json`` (``plan/memwatch.py``): its resident peak, its
memory after start-up and a timeline. ``OUT/rehearsal.json`` gathers them with the wall times;
``gwtn plan --check OUT`` sets them against the plan.

Running every stage in a process of its own is what makes a per-stage peak measurable on a
CPU, where the peak a process reports is the largest since it started.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

from ..arms import arm_named
from ..config import Config, ConfigError, StreamDataConfig, load_config
from ..distributed.runtime import Runtime
from .memwatch import MemoryWatch, write_record

log = logging.getLogger("gwtn")
STAGES = ("wide", "imitate", "finetune")  # the stage commands: the wide net, then the method
SYNTHETIC = {"imagefolder": "imagenet", "text": "wikipedia"}


def stage_list(cfg: Config) -> list[str]:
    """The stages a rehearsal runs, in order: the method's three, then the other arms."""
    return [*STAGES, *(arm for arm in cfg.arms if not arm_named(arm).is_method)]


def rehearsal_overrides(cfg: Config, out: Path, ranks: int, steps: int, micro_batch: int,
                        shards: Path | None, threads: int) -> list[str]:
    """The overrides that turn ``cfg`` into its rehearsal: ``steps`` steps per phase (the
    distillation phase kept only where the config has one), the global batch ``ranks`` ×
    ``micro_batch``, the final evaluation's batch at most 4 × ``micro_batch``, the teacher
    sharded, no evaluation during training, checkpoints at phase ends only, the data read in
    the training process, no teacher cache."""
    f = cfg.finetune
    values = {
        "run_dir": str(out / "run"), "wide.steps": steps, "imitate.steps_per_point": steps,
        "finetune.kd_steps": steps if f.kd_steps else 0,
        "finetune.label_steps": steps if f.label_steps or not f.kd_steps else 0,
        "data.batch_size": ranks * micro_batch,
        "data.eval_batch_size": min(cfg.data.eval_batch_size, 4 * micro_batch),
        "eval_every": 0, "eval_samples": 0, "progress": False,
        "checkpoint.every": 10**9, "log_every": steps, "threads": threads,
        "dist.teacher": "shard", "resume": False,
        "wide.cache": "",  # a rehearsal's teacher is no teacher to keep or reuse
    }
    if isinstance(cfg.data, StreamDataConfig):
        values["data.num_workers"] = 0
    if shards is not None:
        values["data.shards"] = str(shards)
    return [f"{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in values.items()]


def write_synthetic(cfg: Config, out: Path, seq_len: int, samples: int) -> Path | None:
    """Synthetic shards of the config's dataset in ``out/data`` (None for Fashion-MNIST, which
    is real and written on first use); kept when an earlier rehearsal wrote the same ones."""
    kind = SYNTHETIC.get(cfg.data.dataset)
    if kind is None:
        return None
    from ..data.synthetic import write_synthetic_images, write_synthetic_tokens

    folder = out / "data"
    wanted = {"kind": kind, "seq_len": seq_len, "samples": samples}
    stamp = folder / "synthetic.json"
    if stamp.is_file() and json.loads(stamp.read_text()) == wanted:
        return folder
    if kind == "imagenet":
        write_synthetic_images(folder, train=samples, val=8, classes=cfg.model.num_classes)
    else:
        write_synthetic_tokens(folder, train=samples, val=8, test=8, seq_len=seq_len,
                               vocab_size=cfg.model.vocab_size)
    stamp.write_text(json.dumps(wanted))
    return folder


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stage_command(config: str, overrides: list[str], stage: str, ranks: int,
                  record: Path) -> list[str]:
    """The command that runs one stage of the rehearsal on ``ranks`` local processes."""
    gwtn = ["-m", "gwtn_dist", "rehearse", config, *overrides, "--stage", stage,
            "--record", str(record)]
    if ranks == 1:
        return [sys.executable, *gwtn]
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={ranks}",
            "--master-addr=127.0.0.1", f"--master-port={_free_port()}", *gwtn]


def _environment(threads: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONWARNINGS": "ignore"}
    try:
        import torch

        if not torch.cuda.is_available():
            env["DS_ACCELERATOR"] = "cpu"  # DeepSpeed picks its accelerator at first import
    except ImportError:
        pass
    return env


def rehearse(config: str, overrides: list[str], out: Path, *, ranks: int, steps: int,
             micro_batch: int, seq_len: int = 128, real_data: bool = False,
             samples: int = 0, check_fit=None) -> dict:
    """Run every stage of ``config`` for ``steps`` steps per phase on ``ranks`` local ranks;
    returns (and writes to ``out/rehearsal.json``) the wall times and every rank's memory.

    check_fit(config, overrides, ranks, seq_len): called with the rehearsal's config and
    overrides before any stage runs; it raises ConfigError for a layout that cannot fit here
    (the planner's check, ``fits_here``)."""
    if ranks < 1 or steps < 1 or micro_batch < 1:
        raise ConfigError("--ranks, --steps and --micro-batch: positive numbers")
    cfg = load_config(config, overrides)
    out.mkdir(parents=True, exist_ok=True)
    threads = max(1, (os.cpu_count() or 1) // ranks)
    samples = samples or max(64, 4 * ranks * micro_batch)
    shards = None if real_data else write_synthetic(cfg, out, seq_len, samples)
    extra = rehearsal_overrides(cfg, out, ranks, steps, micro_batch, shards, threads)
    everything = [*overrides, *extra]
    rehearsal_cfg = load_config(config, everything)
    if check_fit is not None:
        check_fit(config, everything, ranks, seq_len if shards else None)
    record = {"config": config, "overrides": everything, "ranks": ranks, "steps": steps,
              "micro_batch": micro_batch, "seq_len": seq_len if shards else None,
              "synthetic_data": shards is not None, "stages": {}}
    run_dir = Path(rehearsal_cfg.run_dir)
    if (run_dir / "config.yaml").is_file():  # a rehearsal starts over
        import shutil

        shutil.rmtree(run_dir)
    logs = out / "logs"
    logs.mkdir(exist_ok=True)
    for stage in stage_list(rehearsal_cfg):
        command = stage_command(config, everything, stage, ranks, out / "memory")
        log.info("rehearsal: %s on %d rank(s)", stage, ranks)
        start = time.monotonic()
        with open(logs / f"{stage}.log", "w") as logfile:
            proc = subprocess.run(command, env=_environment(threads), stdout=logfile,
                                  stderr=subprocess.STDOUT, check=False)
        wall = time.monotonic() - start
        if proc.returncode:
            lines = (logs / f"{stage}.log").read_text(errors="replace").strip().splitlines()
            reason = next((ln for ln in reversed(lines) if ln.startswith("gwtn")),
                          lines[-1] if lines else "no output")
            raise RehearsalFailed(stage, proc.returncode, reason, logs / f"{stage}.log")
        per_rank = [json.loads((out / "memory" / f"{stage}-rank{r}.json").read_text())
                    for r in range(ranks)]
        stage_json = run_dir / stage / "stage.json"
        loop_s = json.loads(stage_json.read_text()).get("wall_s") if stage_json.is_file() else None
        record["stages"][stage] = {"wall_s": round(wall, 1), "loop_s": loop_s,
                                   "peak_mb": [r["peak_mb"] for r in per_rank]}
        log.info("rehearsal: %s done in %.0f s, peak %s MiB per rank", stage, wall,
                 ", ".join(f"{r['peak_mb']:.0f}" for r in per_rank))
        (out / "rehearsal.json").write_text(json.dumps(record, indent=1))
    return record


def fits_here(config: str, overrides: list[str], ranks: int, seq_len: int | None) -> None:
    """Refuse (ConfigError, one line) a rehearsal whose plan does not fit this machine's
    available memory shared by ``ranks`` processes."""
    from .check import meminfo_bytes
    from .planner import Layout, MiB, headroom_line, make_plan
    from .probe import measure

    cfg = load_config(config, overrides)
    early, floor = measure(config, overrides, ranks)
    layout = Layout(nodes=1, per_node=ranks, device="cpu", memory=meminfo_bytes("MemAvailable"),
                    reserve=0, runtime=int(floor * MiB), runtime_early=int(early * MiB))
    line = headroom_line(make_plan(cfg, layout, config_name=config, seq_len=seq_len))
    if line:
        raise ConfigError(f"rehearse: {line}; or fewer --ranks, a smaller --micro-batch, "
                          f"--no-plan to try anyway")


class RehearsalFailed(RuntimeError):
    """A stage of the rehearsal ended with a non-zero exit code."""

    def __init__(self, stage: str, code: int, reason: str, logfile: Path):
        super().__init__(f"rehearsal stage {stage} failed (exit {code}): {reason} "
                         f"(log: {logfile})")
        self.code = code


def run_recorded_stage(rt: Runtime, cfg: Config, stage: str, watch: MemoryWatch,
                       record_dir: Path) -> None:
    """One stage (or baseline arm) of a rehearsal on this rank, its memory recorded in
    ``record_dir/<stage>-rank<r>.json``."""
    from ..arms import run_arm
    from ..pipeline import prepare_run_dir, run_stage
    from ..spec import resolve

    watch.mark("setup")
    spec = resolve(cfg)
    if stage in STAGES:
        run_stage(rt, spec, stage)
    else:
        run_dir = prepare_run_dir(rt, cfg, Path(cfg.run_dir), continuing=True)
        run_arm(rt, spec, run_dir, arm_named(stage), run_dir / "wide")
    write_record({"stage": stage, "rank": rt.rank, "world_size": rt.world_size,
                  **watch.finish()}, record_dir / f"{stage}-rank{rt.rank}.json")


def table(record: dict) -> str:
    """The rehearsal's wall times and peaks as a Markdown table."""
    ranks = record["ranks"]
    lines = ["| stage | wall (s) | training loop (s) | " +
             " | ".join(f"peak rank {r} (MiB)" for r in range(ranks)) + " |",
             "|---|---:|---:|" + "---:|" * ranks]
    for stage, s in record["stages"].items():
        loop = f"{s['loop_s']:.1f}" if s["loop_s"] is not None else "-"
        lines.append(f"| {stage} | {s['wall_s']:.0f} | {loop} | " +
                     " | ".join(f"{m:.0f}" for m in s["peak_mb"]) + " |")
    return "\n".join(lines)
