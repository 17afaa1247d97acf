"""``gwtn compare``: the method against its baselines over paired seeds, under a protocol a
reviewer can check (``docs/protocol.md``): choices on a validation split, equal tuning effort
per arm on seeds that are never reported, the test split read once for the report, paired
differences and a verdict against a criterion fixed before the numbers.

Layout under ``run_dir/compare/``:

- ``shared/wide/``: the teacher (``share_teacher``), else ``seed<S>/wide/`` per seed;
- ``tune/<arm>/p<i>/seed<S>/``: tuning point ``i`` of an arm on a tuning seed (validation only);
- ``seed<S>/``: every arm of a reported seed at the method's budget (``x<m>/seed<S>/`` at m×);
- ``compare.md``, ``compare.json``, ``compare.png``: the report.

Every training is a unit of ``workers.run_units``: resumable, and shared between processes,
so a second ``gwtn compare`` of the same config with ``resume=true`` works beside the first.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

from . import arms as arm_registry
from .arms import Arm
from .config import Config, tune_points, with_overrides
from .data.datasets import dataset_of
from .distributed.runtime import Runtime
from .models.task import ScoredTask
from .pipeline import prepare_run_dir
from .report import read_curve, write_compare
from .spec import resolve
from .stages.common import read_stage, stage_done
from .stages.wide import train_wide
from .stats import CRITERION, mean_sd, paired, pays
from .workers import Unit, run_units

log = logging.getLogger("gwtn")


def train_unit(rt: Runtime, cfg: Config, seed_dir: Path, arm: Arm, teacher_dir: Path) -> None:
    """Train one arm of one unit into ``seed_dir``, its config resolved once for it."""
    arm_registry.run_arm(rt, resolve(cfg), seed_dir, arm, teacher_dir)


def arm_record(seed_dir: Path, arm: Arm, task: ScoredTask) -> dict:
    """A finished arm's record: its last stage's, with the wall time of all its stages; an arm
    with a warm start (the method) adds that net's scores and relative errors per point."""
    records = [read_stage(seed_dir / stage) for stage in arm.stages]
    record = {**records[-1], "wall_s": sum(r["wall_s"] for r in records)}
    if arm.warm_start is not None:
        warm = read_stage(seed_dir / arm.warm_start)
        record["after_imitation"] = {k: v for k, v in warm.items() if task.is_score(k)
                                     or k in ("relative_error", "health")}
    return record


def scaled(cfg: Config, mult: float) -> Config:
    """``cfg`` with the method's thin-net budget (so the baselines' too) times ``mult``."""
    if mult == 1:
        return cfg
    i, f = cfg.imitate, cfg.finetune
    per_point = max(1, round(i.steps_per_point * mult))
    return with_overrides(cfg, {
        "imitate.steps_per_point": per_point,
        # The polish comes out of each point's steps, so it scales with them and stays below.
        "imitate.parallel_polish_steps": min(round(i.parallel_polish_steps * mult), per_point - 1),
        "finetune.kd_steps": round(f.kd_steps * mult),
        "finetune.label_steps": round(f.label_steps * mult)})


class ComparePlan:
    """Every unit of a comparison and where it writes, from one config."""

    def __init__(self, rt: Runtime, cfg: Config, out: Path):
        self.rt, self.cfg, self.out, self.c = rt, cfg, out, cfg.compare
        self.spec = resolve(cfg)  # the base config's; each unit resolves its own config
        self.task, self.arms = self.spec.task, self.spec.arms

    # -- where things live
    def teacher_root(self, seed: int) -> Path:
        return self.out / "shared" if self.c.share_teacher else self.out / f"seed{seed}"

    def tune_dir(self, arm: str, point: int, seed: int) -> Path:
        return self.out / "tune" / arm / f"p{point}" / f"seed{seed}"

    def seed_dir(self, mult: float, seed: int) -> Path:
        return self.out / (f"seed{seed}" if mult == 1 else f"x{mult:g}" / Path(f"seed{seed}"))

    def teacher_cfg(self, seed: int) -> Config:
        return self.cfg if self.c.share_teacher else dataclasses.replace(self.cfg, seed=seed)

    # -- the units
    def units(self) -> list[Unit]:
        c, units = self.c, []
        for s in self.teacher_seeds():
            root = self.teacher_root(s)
            units.append(Unit(self.teacher_unit(s), root / ".lock-wide",
                              run=lambda s=s, root=root: train_wide(
                                  self.rt, resolve(self.teacher_cfg(s)), root),
                              done=lambda root=root: stage_done(root / "wide")))
        for arm in self.arms:
            units += self.tuning_units(arm)
        for mult in c.budget_mults:
            for s in c.seeds:
                for arm in self.arms:
                    units.append(self.reported_unit(arm, s, mult))
        return units

    def tuning_units(self, arm: Arm) -> list[Unit]:
        """An arm's tuning grid: one unit per point and tuning seed (validation only)."""
        c, units = self.c, []
        for i, point in enumerate(tune_points(c.tune.get(arm.name, {})) if c.tune else []):
            for s in c.tune_seeds:
                folder = self.tune_dir(arm.name, i, s)
                cfg = with_overrides(dataclasses.replace(self.cfg, seed=s, eval_test=False),
                                     point)
                units.append(Unit(
                    f"tune/{arm.name}/p{i}/seed{s}", folder / f".lock-{arm.name}",
                    run=lambda cfg=cfg, folder=folder, s=s: train_unit(
                        self.rt, cfg, folder, arm, self.teacher_root(s) / "wide"),
                    done=lambda folder=folder: stage_done(folder / arm.final_stage),
                    needs=self._teacher_needs(arm, s)))
        return units

    def reported_unit(self, arm: Arm, s: int, mult: float) -> Unit:
        """An arm on reported seed ``s`` at ``mult`` × the budget, with its tuned recipe (known
        once its tuning units are done, so chosen when the unit runs)."""
        c, folder = self.c, self.seed_dir(mult, s)
        tuned = [f"tune/{arm.name}/p{i}/seed{t}"
                 for i in range(len(tune_points(c.tune[arm.name])) if c.tune else 0)
                 for t in c.tune_seeds]
        return Unit(
            f"x{mult:g}/seed{s}/{arm.name}", folder / f".lock-{arm.name}",
            run=lambda: train_unit(self.rt, self.reported_cfg(arm.name, s, mult), folder, arm,
                                   self.teacher_root(s) / "wide"),
            done=lambda: stage_done(folder / arm.final_stage),
            needs=tuned + self._teacher_needs(arm, s))

    def teacher_seeds(self) -> list[int]:
        """The seeds a teacher is trained with: the base seed when shared, else every tuning
        and reported seed."""
        c = self.c
        if c.share_teacher:
            return [self.cfg.seed]
        return list(dict.fromkeys([*(c.tune_seeds if c.tune else []), *c.seeds]))

    def teacher_unit(self, seed: int) -> str:
        """The name of the unit that trains (or fetches) the teacher of ``seed``."""
        return "teacher" if self.c.share_teacher else f"teacher/seed{seed}"

    def _teacher_needs(self, arm: Arm, seed: int) -> list[str]:
        return [self.teacher_unit(self.cfg.seed if self.c.share_teacher else seed)] \
            if arm.needs_teacher else []

    # -- choices
    def tuning(self, arm: str) -> dict:
        """The arm's grid: every point's validation score (mean over tuning seeds) and the
        chosen point (the best; ties go to the first)."""
        if not self.c.tune:
            return {"points": [], "chosen": {}}
        metric = self.task.select_metric
        rows = []
        for i, point in enumerate(tune_points(self.c.tune[arm])):
            scores = {str(s): arm_record(self.tune_dir(arm, i, s), arm_registry.ARMS[arm],
                                         self.task)[metric]
                      for s in self.c.tune_seeds}
            rows.append({"point": point, "per_seed": scores,
                         "score": mean_sd(list(scores.values()))[0]})
        best = max(range(len(rows)), key=lambda i: (rows[i]["score"], -i))
        for i, row in enumerate(rows):
            row["chosen"] = i == best
        return {"metric": metric, "points": rows, "chosen": rows[best]["point"]}

    def reported_cfg(self, arm: str, seed: int, mult: float) -> Config:
        chosen = self.tuning(arm)["chosen"]
        return scaled(with_overrides(dataclasses.replace(self.cfg, seed=seed), chosen), mult)


def _arm_row(records: dict[int, dict], steps: int, metrics: list[str], secondary) -> dict:
    """Per-seed values, mean and sd of each metric; params, steps, wall time."""
    walls = [r["wall_s"] for r in records.values()]
    row = {"steps": steps, "params": next(iter(records.values()))["params"],
           "wall_s_mean": sum(walls) / len(walls)}
    for name in dict.fromkeys([*metrics, *secondary]):
        values = {str(s): r[name] for s, r in records.items() if name in r}
        m, sd = mean_sd(list(values.values()))
        row[name] = {"mean": m, "std": sd, "per_seed": values}
    head = row[metrics[-1]]
    row.update(mean=head["mean"], std=head["std"], per_seed=head["per_seed"])
    return row


def _after_imitation(records: dict[int, dict]) -> dict:
    """The method's net straight after imitation, per seed (scores, relative errors)."""
    return {str(s): r["after_imitation"] for s, r in records.items() if "after_imitation" in r}


def _budget_table(plan: ComparePlan, mult: float) -> dict:
    c, task = plan.c, plan.task
    budget = dataclasses.replace(plan.spec, cfg=scaled(plan.cfg, mult)).budget
    metrics = [task.select_metric, task.metric]
    records = {arm.name: {s: arm_record(plan.seed_dir(mult, s), arm, task) for s in c.seeds}
               for arm in plan.arms}
    rows = {name: _arm_row(records[name], budget, metrics, task.secondary) for name in records}
    table = {"budget_mult": mult, "budget_steps": budget, "arms": rows, "paired": {},
             "verdicts": {}}
    for arm in plan.arms:
        if arm.warm_start is not None:
            table["after_imitation"] = _after_imitation(records[arm.name])
    for arm, ref, bar in verdict_pairs(plan.arms):
        diff = paired(rows[arm]["per_seed"], rows[ref]["per_seed"])
        ok = pays(diff, rows[arm]["mean"], rows[bar]["mean"] if bar in rows else None)
        table["paired"][f"{arm}-{ref}"] = diff
        table["verdicts"][f"{arm}-{ref}"] = ok
    return table


def verdict_pairs(arms: tuple[Arm, ...]) -> list[tuple[str, str, str | None]]:
    """(arm, reference, bar) of every paired verdict among ``arms``: each arm against its first
    reference (scratch), then the further ones (the method against a deeper thin net)."""
    names = {arm.name for arm in arms}
    first = [(a.name, a.judged_against[0], a.bar) for a in arms
             if a.judged_against and a.judged_against[0] in names]
    further = [(a.name, ref, None) for a in arms for ref in a.judged_against[1:] if ref in names]
    return first + further


def _teacher(plan: ComparePlan, scratch: dict | None) -> dict:
    c, task = plan.c, plan.task
    seeds = [plan.cfg.seed] if c.share_teacher else c.seeds
    every = {s: read_stage(plan.teacher_root(s) / "wide") for s in plan.teacher_seeds()}
    records = {s: every[s] for s in seeds}
    row = _arm_row(records, plan.cfg.wide.steps, [task.select_metric, task.metric],
                   task.secondary)
    row["shared"] = c.share_teacher
    # Every teacher this comparison trained (tuning seeds' too when not shared), and their time.
    row["teachers_trained"] = len(every)
    row["teacher_wall_s_total"] = round(sum(r["wall_s"] for r in every.values()), 1)
    row["from_cache"] = sorted({r["from_cache"] for r in records.values() if "from_cache" in r})
    if scratch is not None:
        # The teacher's cost in thin-net steps: its wall time over scratch's time per step.
        per_step = scratch["wall_s_mean"] / scratch["steps"]
        row["thin_step_equivalents"] = round(row["wall_s_mean"] / per_step)
        headroom = row[task.select_metric]["mean"] - scratch[task.select_metric]["mean"]
        needed = max(c.headroom_min, 2 * scratch[task.select_metric]["std"])
        row["headroom"] = {"value": headroom, "needed": needed, "clear": headroom >= needed,
                           "metric": task.select_metric}
    return row


def compare(rt: Runtime, cfg: Config) -> dict:
    """Train every unit of ``cfg.compare`` for every arm of ``cfg.arms`` (with any other worker
    on the same folder), then write and return the report."""
    plan = plan_compare(rt, cfg)
    run_units(rt, plan.units())
    return report_compare(plan)


def plan_compare(rt: Runtime, cfg: Config) -> ComparePlan:
    """Check or create ``run_dir/compare/`` (config.yaml, as for a resume) and plan its units."""
    out_dir = prepare_run_dir(rt, cfg, Path(cfg.run_dir) / "compare", exclusive=False)
    return ComparePlan(rt, cfg, out_dir)


def report_compare(plan: ComparePlan) -> dict:
    """The comparison's table from its finished units; rank 0 writes ``compare.md``,
    ``compare.json`` and ``compare.png`` and prints the markdown."""
    rt, cfg, out_dir = plan.rt, plan.cfg, plan.out
    c, task = plan.c, plan.task
    family = plan.spec.family
    depth = f"{family.thin_depth(cfg.model)} {family.depth_label}"
    budgets = [_budget_table(plan, m) for m in c.budget_mults]
    first = budgets[0]
    table = {
        "title": f"{cfg.data.dataset}: thin {depth}, budget {first['budget_steps']} steps",
        "metric": task.metric, "metric_label": task.metric_label,
        "select_metric": task.select_metric, "secondary": list(task.secondary),
        "criterion": CRITERION,
        "seeds": c.seeds, "tune_seeds": c.tune_seeds if c.tune else [],
        "val_samples": dataset_of(cfg).carved_val_samples(cfg),
        "validation": task.validation, "separate_test": task.separate_test,
        "labels": dict(task.labels), "digits": dict(task.digits),
        "tuning": {arm: plan.tuning(arm) for arm in cfg.arms},
        "budget_steps": first["budget_steps"], "arms": first["arms"],
        "budgets": budgets,
        # The teacher's headroom and cost are measured against the method's first reference.
        "teacher": _teacher(plan, first["arms"].get(arm_registry.method().judged_against[0])),
    }
    if not rt.is_main:
        return table
    # One line per arm and budget: "<arm>" at the first budget, "<arm>@x<m>" at the others.
    curves = {arm.name if i == 0 else f"{arm.name}@x{mult:g}": [read_curve(
        [plan.seed_dir(mult, s) / stage for stage in arm.stages], task.select_metric)
        for s in c.seeds] for i, mult in enumerate(c.budget_mults) for arm in plan.arms}
    write_compare(out_dir, table, curves)
    print((out_dir / "compare.md").read_text())
    return table
