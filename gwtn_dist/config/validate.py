"""The checks of a whole config, across fields and sections (``validate``): each raises
ConfigError naming the dotted key and what is allowed. Each value's type was checked when the
config was built (``coerce``); the families check their own keys (``ModelConfig.check``), each
dataset its ``data`` section (``DataConfig.check``), and the planning sections are checked in
``experiments``.
"""

from __future__ import annotations

import dataclasses

from .coerce import _set_dotted, build_config, to_dict
from .experiments import check_arms, check_compare, check_regime_axes, regime_cells
from .rundir import check_run_dir
from .schema import (
    MAX_SEED,
    MAX_STEPS,
    MAX_THREADS,
    Config,
    ConfigError,
    OptimConfig,
    RegimeConfig,
    _at_most,
    _positive,
    optim_sections,
)


def _check_bounds(cfg: Config) -> None:
    """The upper bounds of ``schema`` (``MAX_*``; lower bounds are checked with each key, the
    data section's both by ``DataConfig.check``)."""
    seeds = {"seed": [cfg.seed], "compare.seeds": cfg.compare.seeds,
             "compare.tune_seeds": cfg.compare.tune_seeds}
    for key, values in seeds.items():
        for value in values:
            if not 0 <= value <= MAX_SEED:
                raise ConfigError(f"{key}: a seed in [0, {MAX_SEED}] (2**32 - 1), got {value}")
    _at_most("threads", cfg.threads, MAX_THREADS)
    counts = {"wide.steps": cfg.wide.steps, "imitate.steps_per_point":
              cfg.imitate.steps_per_point, "finetune.kd_steps": cfg.finetune.kd_steps,
              "finetune.label_steps": cfg.finetune.label_steps, "eval_every": cfg.eval_every,
              "eval_samples": cfg.eval_samples, "log_every": cfg.log_every,
              "checkpoint.every": cfg.checkpoint.every,
              "profile.sample_every": cfg.profile.sample_every,
              "profile.trace_start": cfg.profile.trace_start,
              "profile.trace_steps": cfg.profile.trace_steps}
    counts.update({f"{prefix}.warmup_steps": o.warmup_steps for prefix, o in optim_sections(cfg)})
    for key, value in counts.items():
        _at_most(key, value, MAX_STEPS)


def _check_optim(prefix: str, o: OptimConfig, batch_size: int) -> None:
    _positive(f"{prefix}.lr", o.lr)
    _positive(f"{prefix}.accumulate", o.accumulate)
    if batch_size % o.accumulate:
        raise ConfigError(f"{prefix}.accumulate: data.batch_size {batch_size} does not split "
                          f"into {o.accumulate} equal micro-batches")
    _positive(f"{prefix}.weight_decay", o.weight_decay, allow_zero=True)
    _positive(f"{prefix}.warmup_steps", o.warmup_steps, allow_zero=True)
    _positive(f"{prefix}.grad_clip", o.grad_clip, allow_zero=True)
    if not 0 <= o.momentum < 1:
        raise ConfigError(f"{prefix}.momentum: must be in [0, 1), got {o.momentum}")
    if not 0 <= o.min_lr_ratio <= 1:
        raise ConfigError(f"{prefix}.min_lr_ratio: must be in [0, 1], got {o.min_lr_ratio}")
    if len(o.betas) != 2 or not all(0 <= b < 1 for b in o.betas):
        raise ConfigError(f"{prefix}.betas: must be two numbers in [0, 1), got {o.betas}")
    if any(not 0 < m < 1 for m in o.milestones) or o.milestones != sorted(o.milestones):
        raise ConfigError(
            f"{prefix}.milestones: fractions of the phase in (0, 1), ascending; got {o.milestones}"
        )


def _check_model(cfg: Config) -> None:
    """The model section through its family's class (which also checks the family's keys
    elsewhere, such as ``compare.deeper_*``), and that the family trains on the data given."""
    datasets = type(cfg.model).DATASETS
    if cfg.data.dataset not in datasets:
        raise ConfigError(
            f"data.dataset: {cfg.data.dataset!r} does not fit model.family "
            f"{cfg.model.family!r}, which trains on {' or '.join(repr(d) for d in datasets)}")
    _positive("model.widen.boundary_mult", cfg.model.widen.boundary_mult)
    cfg.model.check(cfg)


def _check_wide(cfg: Config) -> None:
    w = cfg.wide
    if w.steps < 0 or (w.steps == 0 and not w.init):
        raise ConfigError(f"wide.steps: must be > 0 (0 only with wide.init, a teacher that is "
                          f"loaded, not trained), got {w.steps}")


def _check_imitate(cfg: Config) -> None:
    i = cfg.imitate
    _positive("imitate.steps_per_point", i.steps_per_point)
    if i.lower_lr_mult < 0:
        raise ConfigError(f"imitate.lower_lr_mult: must be >= 0, got {i.lower_lr_mult}")
    polish = i.parallel_polish_steps
    _positive("imitate.parallel_polish_steps", polish, allow_zero=True)
    if polish and i.schedule != "parallel":
        raise ConfigError("imitate.parallel_polish_steps: a polish follows the parallel "
                          "schedule only; set imitate.schedule=parallel or leave it 0")
    if polish >= i.steps_per_point:
        raise ConfigError(f"imitate.parallel_polish_steps: must be < imitate.steps_per_point "
                          f"({i.steps_per_point}), the budget it comes out of; "
                          f"got {polish}")
    _positive("imitate.health_max_error", i.health_max_error)
    if i.point_site == "preact" and i.schedule != "sequential":
        raise ConfigError("imitate.point_site: preact needs imitate.schedule=sequential (a "
                          "parallel segment starts from the teacher's output after the ReLU)")


def _check_finetune_and_baseline(cfg: Config) -> None:
    """The finetune phases and distillation, every phase's optimizer, the baselines' recipe."""
    f = cfg.finetune
    _positive("finetune.kd_steps", f.kd_steps, allow_zero=True)
    _positive("finetune.label_steps", f.label_steps, allow_zero=True)
    if f.kd_steps + f.label_steps == 0:
        raise ConfigError("finetune: kd_steps + label_steps must be > 0")
    if not 0 <= f.distill.alpha <= 1:
        raise ConfigError(f"finetune.distill.alpha: must be in [0, 1], got {f.distill.alpha}")
    _positive("finetune.distill.temperature", f.distill.temperature)
    for prefix, o in optim_sections(cfg):
        _check_optim(prefix, o, cfg.data.batch_size)
    if not 0 <= cfg.baseline.distill.alpha <= 1:
        raise ConfigError(f"baseline.distill.alpha: must be in [0, 1], got "
                          f"{cfg.baseline.distill.alpha}")
    _positive("baseline.distill.temperature", cfg.baseline.distill.temperature)


def _check_experiments(cfg: Config) -> None:
    """The arms, the regime study (each cell a config that loads) and the comparison."""
    if not cfg.compare.seeds:
        raise ConfigError("compare.seeds: give at least one seed")
    check_arms(cfg)
    check_regime_axes(cfg)
    for _, overrides in regime_cells(cfg):
        tree = to_dict(dataclasses.replace(cfg, regime=RegimeConfig()))
        for key, value in overrides.items():
            _set_dotted(tree, key, value)
        validate(build_config(tree))
    check_compare(cfg)


def _check_run(cfg: Config) -> None:
    """Evaluation, logging, checkpoints, profiling and threads."""
    _positive("eval_samples", cfg.eval_samples, allow_zero=True)
    _positive("checkpoint.every", cfg.checkpoint.every)
    _positive("eval_every", cfg.eval_every, allow_zero=True)
    _positive("log_every", cfg.log_every)
    _positive("profile.sample_every", cfg.profile.sample_every, allow_zero=True)
    _positive("profile.trace_start", cfg.profile.trace_start, allow_zero=True)
    _positive("profile.trace_steps", cfg.profile.trace_steps)
    _positive("threads", cfg.threads, allow_zero=True)


def _check_dist(cfg: Config) -> None:
    _positive("dist.timeout_s", cfg.dist.timeout_s)
    _positive("dist.rendezvous_timeout_s", cfg.dist.rendezvous_timeout_s)
    if not 0 < cfg.dist.teacher_memory_fraction <= 1:
        raise ConfigError(f"dist.teacher_memory_fraction: must be in (0, 1], got "
                          f"{cfg.dist.teacher_memory_fraction}")
    for key in ("optimizer", "scheduler"):
        if key in cfg.dist.deepspeed:
            raise ConfigError(f"dist.deepspeed.{key}: the optimizer and its schedule come from "
                              f"each stage's optim section, not from the DeepSpeed config")


def validate(cfg: Config) -> None:
    """Cross-field checks; raises ConfigError naming the key."""
    check_run_dir(cfg.run_dir)
    _check_bounds(cfg)  # the data section's bounds: its own check
    _check_model(cfg)
    cfg.data.check()
    _check_wide(cfg)
    _check_imitate(cfg)
    _check_finetune_and_baseline(cfg)
    _check_experiments(cfg)
    _check_run(cfg)
    _check_dist(cfg)
