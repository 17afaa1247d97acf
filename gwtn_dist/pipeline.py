"""``gwtn run`` and ``gwtn wide|imitate|finetune``: the stages in a run directory, behind one
guard (``prepare_run_dir``, which ``gwtn compare`` and ``gwtn regime`` use too).

A run directory holds the resolved ``config.yaml``. Starting again in a directory that already
holds a run is an error unless ``resume=true``, and resuming with a different config is an error
that names the keys that differ: a resumed run must be the run that was started. A stage
command (``gwtn wide|imitate|finetune``) continues a run directory without ``resume=true`` but
under the same check. While a run or stage command works in a directory it holds
``RUN_DIR/.lock`` (host and pid), so a second one there fails at once naming the holder.
"""

from __future__ import annotations

import atexit
import logging
from pathlib import Path

import torch
import yaml

from .arms import method, run_arm
from .config import Config, ConfigError, dump_config, to_dict, upgrade_saved_tree
from .distributed.runtime import Runtime, barrier
from .report import format_run_table, plot_curves, read_curve
from .spec import RunSpec, resolve
from .stages.finetune import finetune
from .stages.imitate import imitate
from .stages.wide import train_wide
from .workers import FileLock

log = logging.getLogger("gwtn")
# Keys that do not change what a run computes: a resume may change them (run_dir too: a run
# folder moved or copied elsewhere is resumed where it now is).
VOLATILE = {"resume", "progress", "threads", "log_every", "profile.sample_every",
            "profile.trace_start", "profile.trace_steps", "data.eval_missing_ok", "run_dir"}


def _flatten(tree: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


_held: list[FileLock] = []


def _lock(rt: Runtime, run_dir: Path) -> None:
    """Hold ``run_dir/.lock`` for the rest of this process (rank 0 takes it for the job)."""
    lock = FileLock(run_dir / ".lock")
    if not rt.rank0_says(rt.is_main and lock.acquire()):
        held = lock.holder() or {}
        raise ConfigError(
            f"{run_dir} is in use by process {held.get('pid', '?')} on {held.get('host', '?')}; "
            f"wait for it, or remove {lock.path} if that process is gone")
    if lock.held:
        _held.append(lock)
        atexit.register(lock.release)


def release_locks() -> None:
    """Give up the run folders this process holds (the CLI calls it when a command ends)."""
    while _held:
        _held.pop().release()


def prepare_run_dir(rt: Runtime, cfg: Config, run_dir: Path, *, continuing: bool = False,
                    exclusive: bool = True) -> Path:
    """Create ``run_dir`` or check that resuming it is safe; writes the resolved config (the
    one ``config.yaml`` of the folder, rewritten only after the check: a resume may differ
    from it in ``VOLATILE`` keys alone); then applies the run's process settings.

    continuing: a stage command, which may add a stage to an existing run without
    ``resume=true`` but not change its config. exclusive: hold the run folder's lock (``gwtn
    compare`` shares its folder between workers and locks each unit instead).
    """
    saved = run_dir / "config.yaml"
    # A folder with files but no saved config: not ours for gwtn run; a stage command may
    # continue it (stages handed over by path, e.g. a teacher copied into run_dir/wide).
    foreign = not continuing and run_dir.exists() and not saved.is_file() and any(
        not p.name.startswith(".lock") for p in run_dir.iterdir())  # the lock's own files
    if exclusive and not foreign:
        _lock(rt, run_dir)
    if saved.is_file():
        if not (cfg.resume or continuing):
            raise ConfigError(
                f"{run_dir} already holds a run; pass resume=true to continue it, or choose "
                f"another run_dir"
            )
        old = _flatten(upgrade_saved_tree(yaml.safe_load(saved.read_text())))
        new = _flatten(to_dict(cfg))
        # A key the saved config lacks was added to gwtn_dist since the run started: keeping
        # its default keeps what the run computes, so only a value off the default counts.
        defaults = _flatten(to_dict(Config()))
        old = {**{k: defaults[k] for k in new if k not in old and k in defaults}, **old}
        changed = sorted(k for k in set(old) | set(new)
                         if k not in VOLATILE and old.get(k) != new.get(k))
        if changed:
            raise ConfigError(
                f"{'resume=true but ' if cfg.resume else ''}the config differs from the one "
                f"{run_dir} was started with: "
                + ", ".join(f"{k} ({old.get(k)!r} → {new.get(k)!r})" for k in changed)
            )
    elif foreign:
        raise ConfigError(f"{run_dir} exists and is not a gwtn run directory; choose another")
    barrier()  # every rank has checked before rank 0 writes
    if rt.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        dump_config(cfg, saved)
    barrier()
    apply_runtime(cfg)
    return run_dir


def apply_runtime(cfg: Config) -> None:
    """The process settings a config asks for (``threads``)."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)


STAGES = {"wide": train_wide, "imitate": imitate, "finetune": finetune}


def run_stage(rt: Runtime, spec: RunSpec, stage: str) -> tuple[Path, dict]:
    """One stage (``wide``, ``imitate`` or ``finetune``) in ``run_dir``, behind the same guard
    as ``run_all`` (a stage may continue a run without ``resume=true``, never under a changed
    config); returns the run folder and the stage's record."""
    run_dir = prepare_run_dir(rt, spec.cfg, Path(spec.cfg.run_dir), continuing=True)
    return run_dir, STAGES[stage](rt, spec, run_dir)


def run_all(rt: Runtime, cfg: Config) -> dict:
    """The wide stage in ``cfg.run_dir``, then the method (imitate → finetune), then every
    other arm of ``cfg.arms``; writes results.md (and curves.png with ``eval_every``)."""
    spec = resolve(cfg)
    run_dir = prepare_run_dir(rt, cfg, Path(cfg.run_dir))
    records = {"wide": train_wide(rt, spec, run_dir)}
    arms = [method(), *(arm for arm in spec.arms if not arm.is_method)]
    for arm in arms:
        records.update(run_arm(rt, spec, run_dir, arm, run_dir / "wide"))
    task = spec.task
    table = format_run_table(records, task.metric, task.metric_label,
                             select=task.select_metric, labels=task.labels)
    if not rt.is_main:
        return records
    (run_dir / "results.md").write_text(table + "\n")
    if cfg.eval_every:
        # Curves read the validation split (the test split is for the table only).
        metric = task.select_metric
        curves = {arm.name: [read_curve([run_dir / stage for stage in arm.stages], metric)]
                  for arm in arms}
        label = task.labels.get(metric, metric.replace("_", " "))
        plot_curves(run_dir / "curves.png", curves,
                    {"title": f"thin net: {label} vs thin-net steps"},
                    teacher_accuracy=records["wide"][metric], label=label)
    print(table)
    return records
