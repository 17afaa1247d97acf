"""A short stage-2 run on one GPU in bf16 with each imitation loss backend: the step time.

The real ``imitate`` stage (its phases, the training loop, the torch engine with autocast, the
loss backends, checkpoints) runs on a config's nets, freshly initialised (a step's time does not
depend on the weights), with two things swapped so that neither data nor DeepSpeed is needed:
batches are synthetic and in memory (images (B, C, S, S) or token ids (B, T) of the config's
shapes), and the finished stage is not scored (its metrics are NaN). webdataset and braceexpand,
which the data modules import at the top, are replaced by stand-ins when they are not installed;
DeepSpeed is never imported on one process.

    python3 benchmarks/imitation_run.py OUT_DIR [--config C] [--steps N]
        [--backends triton,reference] [--schedules sequential,parallel] [--compiled triton]
        [overrides …]

For each schedule and backend it writes ``OUT_DIR/<schedule>-<backend>/`` (the stage's files) and
one row of ``OUT_DIR/imitation_run.csv``: the median logged step time (the first logged window of
each phase left out: autotuning, cuDNN's choices and torch.compile happen there), samples/s, peak
memory and the stage's wall time. ``--compiled B1,B2`` adds a run per named backend with
``model.compile=true`` (first schedule only; ``<schedule>-<backend>-compiled/``). Exit status 2
without a CUDA GPU.
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import statistics
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.checkout import REPO, require_cuda, stub_if_missing, use_checkout

# The data modules import these at the top; the synthetic batches never call them (the lent
# GPU machine had neither when last described).
STOOD_IN = ("webdataset", "braceexpand")

FIELDS = ["schedule", "backend", "compiled", "precision", "batch", "steps", "step_ms",
          "samples_per_s", "peak_mem_mb", "stage_wall_s", "final_loss"]


class SyntheticBatches:
    """In-memory training batches with the shapes of ``cfg``'s data, reproducible by step.

    Images: normalised (B, C, S, S) floats and (B,) labels; text: {"input_ids",
    "attention_mask"} (B, T) and masked-LM labels (B, T). Resumable like the real streams
    (``position`` / ``seek``)."""

    per_rank = True

    def __init__(self, cfg, seed: int):
        self.cfg, self.seed, self.n = cfg, seed, 0
        self.skipped: dict[str, int] = {}  # no bad samples in memory

    @property
    def position(self) -> dict:
        return {"batches": self.n}

    def seek(self, position: dict) -> None:
        self.n = position["batches"]

    def next(self, phase_index: int, step: int):
        import torch

        from gwtn_dist.models.family import family_for

        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.n)
        self.n += 1
        return family_for(self.cfg).synthetic_batch(self.cfg, self.cfg.data.batch_size, g)


def synthetic_context(rt, spec, stage_dir, modules, stream_tag, step_offset=0):
    """``stages.common.loop_context`` with synthetic batches and no evaluation."""
    from functools import partial

    from gwtn_dist.stages.common import resolve_device
    from gwtn_dist.stages.loop import LoopContext

    cfg, task = spec.cfg, spec.task
    device = resolve_device(rt, cfg)
    return LoopContext(
        stage_dir=stage_dir, modules=modules, batches=SyntheticBatches(cfg, stream_tag),
        device=device, micro_batch=cfg.data.batch_size // rt.world_size,
        prepare=partial(task.prepare, device=device, dtype=rt.dtype),
        checkpoint_every=cfg.checkpoint.every, dist=cfg.dist, rt=rt, progress=cfg.progress,
        evaluate=None, eval_every=0, step_offset=step_offset, log_every=cfg.log_every,
        profile=cfg.profile)


def not_scored(rt, model, task, device, limit: int = 0, split: str = "test") -> dict:
    """What ``finish_stage`` records instead of scores: no held-out data here."""
    return {task.metric: float("nan"), task.select_metric: float("nan")}


def step_summary(stage_dir: Path) -> dict:
    """Median logged step time (each phase's first logged window left out), samples/s, peak
    memory, from the stage's metrics.jsonl and stage.json."""
    recs = [json.loads(line) for line in (stage_dir / "metrics.jsonl").read_text().splitlines()]
    timed, seen = [], set()
    for r in recs:
        if "step_s" not in r:
            continue
        if r["phase"] not in seen:  # the first window: autotuning, cuDNN benchmarks
            seen.add(r["phase"])
            continue
        timed.append(r)
    timed = timed or [r for r in recs if "step_s" in r]
    if not timed:
        raise SystemExit(f"{stage_dir}: no step was timed; give --steps 2 or more")
    stage = json.loads((stage_dir / "stage.json").read_text())
    return {"steps": stage["steps"], "stage_wall_s": stage["wall_s"],
            "final_loss": round(stage["final_loss"], 5),
            "step_ms": round(1e3 * statistics.median(r["step_s"] for r in timed), 3),
            "samples_per_s": round(statistics.median(r["samples_per_s"] for r in timed), 1),
            "peak_mem_mb": max(r["peak_mem_mb"] for r in timed)}


def run_one(config: str, out: Path, schedule: str, backend: str, precision: str, steps: int,
            overrides: list[str], compiled: bool = False) -> dict:
    """One imitation stage under a fresh teacher; its row of the table."""
    import torch

    from gwtn_dist import checkpoint
    from gwtn_dist.config import load_config
    from gwtn_dist.distributed import setup
    from gwtn_dist.spec import resolve
    from gwtn_dist.stages import common, imitate

    run_dir = out / f"{schedule}-{backend}{'-compiled' if compiled else ''}"
    shutil.rmtree(run_dir, ignore_errors=True)
    cfg = load_config(config, [
        f"run_dir={run_dir}", "dist.engine=torch", f"dist.precision={precision}",
        f"imitate.loss_backend={backend}", f"imitate.schedule={schedule}",
        f"imitate.steps_per_point={steps}", "progress=false", "eval_every=0",
        f"log_every={min(10, max(1, steps // 2))}",  # at least two timed windows per phase
        f"checkpoint.every={10 * steps}", "wide.cache=", *overrides,
        *(["model.compile=true"] if compiled else [])])
    rt = setup.setup(cfg)
    spec = resolve(cfg)
    torch.manual_seed(cfg.seed)
    (run_dir / "wide").mkdir(parents=True)
    checkpoint.save_weights(spec.build_wide(), run_dir / "wide" / "model.pt",
                            {"stage": "wide", **spec.shape_meta(wide=True)})
    (run_dir / "wide" / "DONE").write_text("")
    saved = imitate.loop_context, common.evaluate
    imitate.loop_context, common.evaluate = synthetic_context, not_scored
    try:
        imitate.imitate(rt, spec, run_dir)
    finally:
        imitate.loop_context, common.evaluate = saved
    return {"schedule": schedule, "backend": backend, "compiled": compiled,
            "precision": precision, "batch": cfg.data.batch_size,
            **step_summary(run_dir / "imitate")}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("out", help="folder for the runs and imitation_run.csv")
    p.add_argument("--config", default=str(REPO / "configs" / "fmnist_resnet.yaml"))
    p.add_argument("--steps", type=int, default=40, help="imitate.steps_per_point (default 40)")
    p.add_argument("--backends", default="triton,reference")
    p.add_argument("--schedules", default="sequential,parallel")
    p.add_argument("--precision", default="bf16")
    p.add_argument("--compiled", default="",
                   help="backends to run once more with model.compile=true (first schedule)")
    p.add_argument("--compile-backend", default="inductor",
                   help="torch.compile's backend for those runs (the CPU rehearsal: aot_eager)")
    p.add_argument("--allow-cpu", action="store_true",
                   help="run on CPU (reference backend only): a smoke test of this script")
    p.add_argument("overrides", nargs="*", help="dotted config overrides")
    args = p.parse_intermixed_args(argv)
    if not args.allow_cpu:
        require_cuda()
    use_checkout()
    for name in STOOD_IN:
        if stub_if_missing(name):
            print(f"{name} is not installed: its modules import a stand-in (never called; the "
                  f"batches are synthetic)", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    from gwtn_dist.models import compiled

    compiled.BACKEND = args.compile_backend
    schedules = args.schedules.split(",")
    runs = [(s, b, False) for s in schedules for b in args.backends.split(",")]
    runs += [(schedules[0], b, True) for b in args.compiled.split(",") if b]
    rows = []
    for schedule, backend, compile_nets in runs:
        row = run_one(args.config, out, schedule, backend, args.precision, args.steps,
                      args.overrides, compile_nets)
        rows.append(row)
        print(f"  {schedule} {backend}{' compiled' if compile_nets else ''}: "
              f"{row['step_ms']:.2f} ms/step, "
              f"{row['samples_per_s']:.0f} samples/s, peak {row['peak_mem_mb']:.0f} MB, "
              f"stage {row['stage_wall_s']:.1f} s", flush=True)
        # Written after every run: a check stopped at its time limit keeps what it timed.
        with (out / "imitation_run.csv").open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=FIELDS)
            writer.writeheader()
            writer.writerows(rows)
    by = {(r["schedule"], r["backend"]): r for r in rows if not r["compiled"]}
    for schedule in schedules:
        fused, ref = by.get((schedule, "triton")), by.get((schedule, "reference"))
        if fused and ref:
            ratio = ref["step_ms"] / fused["step_ms"]
            print(f"{schedule}: reference/triton step time {ratio:.2f}x ({args.precision})")
    for r in rows:
        eager = by.get((r["schedule"], r["backend"]))
        if r["compiled"] and eager:
            print(f"{r['schedule']} {r['backend']}: eager/compiled step time "
                  f"{eager['step_ms'] / r['step_ms']:.2f}x ({args.precision})")
    print(f"wrote {out / 'imitation_run.csv'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
