"""``gwtn compare``: the method against its baselines over several seeds.

Layout: ``run_dir/compare/seed<S>/{wide,imitate,finetune,scratch,kd,deeper}/`` (with
``share_teacher`` one wide net in ``run_dir/compare/teacher/``), and the results in
``run_dir/compare/compare.{md,json,png}``. Every arm is resumable like any stage.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

from .config import Config
from .distributed.runtime import current
from .pipeline import apply_runtime, prepare_run_dir
from .report import mean_std, read_curve, write_compare
from .stages.arms import method_budget, train_baseline
from .stages.finetune import finetune
from .stages.imitate import imitate
from .stages.tasks import ImageTask, TextTask, task_for
from .stages.wide import train_wide

log = logging.getLogger("gwtn")


def _arm_row(records: dict[int, dict], steps: int, task: ImageTask | TextTask) -> dict:
    """Mean ± std over seeds of the task's metric (and of its secondary metrics)."""
    walls = [r["wall_s"] for r in records.values()]
    mean, std = mean_std([r[task.metric] for r in records.values()])
    row = {"mean": mean, "std": std, "steps": steps,
           "params": next(iter(records.values()))["params"],
           "per_seed": {str(s): r[task.metric] for s, r in records.items()},
           "wall_s_mean": sum(walls) / len(walls)}
    for name in task.secondary:
        m, sd = mean_std([r[name] for r in records.values()])
        row[name] = {"mean": m, "std": sd,
                     "per_seed": {str(s): r[name] for s, r in records.items()}}
    return row


def compare(cfg: Config) -> dict:
    """Train every arm of ``cfg.compare`` for every seed; write and return the table."""
    out_dir = prepare_run_dir(cfg, Path(cfg.run_dir) / "compare")
    apply_runtime(cfg)
    c = cfg.compare
    task = task_for(cfg)
    budget = method_budget(cfg)
    per_arm: dict[str, dict[int, dict]] = {arm: {} for arm in c.arms}
    teachers: dict[int, dict] = {}
    curves: dict[str, list] = {arm: [] for arm in c.arms}
    for seed in c.seeds:
        scfg = dataclasses.replace(cfg, seed=seed)
        seed_dir = out_dir / f"seed{seed}"
        log.info("compare: seed %d", seed)
        # One teacher per seed, or one for all seeds (trained with the base seed).
        teacher_root, tcfg = (out_dir / "shared", cfg) if c.share_teacher else (seed_dir, scfg)
        teachers[tcfg.seed] = train_wide(tcfg, teacher_root)
        teacher_dir = teacher_root / "wide"
        for arm in c.arms:
            if arm == "win":
                imit = imitate(scfg, seed_dir, teacher_dir=teacher_dir)
                fine = finetune(scfg, seed_dir, teacher_dir=teacher_dir)
                per_arm[arm][seed] = {**fine, "wall_s": imit["wall_s"] + fine["wall_s"]}
                curves[arm].append(read_curve([seed_dir / "imitate", seed_dir / "finetune"],
                                              task.metric))
            else:
                per_arm[arm][seed] = train_baseline(scfg, seed_dir, arm,
                                                    teacher=teacher_dir / "model.pt")
                curves[arm].append(read_curve([seed_dir / arm], task.metric))
    depth = (f"{cfg.model.layers} layers" if cfg.model.family == "bert"
             else f"{cfg.model.blocks} blocks")
    table = {
        "title": f"{cfg.data.dataset}: thin {depth}, budget {budget} steps",
        "metric": task.metric, "metric_label": task.metric_label,
        "secondary": list(task.secondary),
        "budget_steps": budget,
        "seeds": c.seeds,
        "arms": {arm: _arm_row(per_arm[arm], budget, task) for arm in c.arms},
        "teacher": {**_arm_row(teachers, cfg.wide.steps, task), "shared": c.share_teacher},
    }
    if not current().is_main:
        return table
    header = (f"# Go Wide, Then Narrow vs baselines — {table['title']}, "
              f"{len(c.seeds)} seed(s) {c.seeds}")
    write_compare(out_dir, table, curves, header)
    print((out_dir / "compare.md").read_text())
    return table
