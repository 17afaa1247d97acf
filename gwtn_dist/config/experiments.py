"""Experiment planning: the arms a run trains or ``gwtn compare`` compares, what each may tune,
the points of a tuning grid, the cells of a regime study, and the checks of those sections
(``arms``, ``compare``, ``regime.axes``).
"""

from __future__ import annotations

from ..arms import ARMS, BUDGET_KEYS
from .coerce import to_dict
from .schema import Config, ConfigError, _positive

# The arms, what each may tune (the method its own stages, the baselines their recipe,
# ``baseline``, kept apart from the teacher's ``wide.optim``) and the keys that set the
# thin-net budget every arm shares (no arm may tune them) are the arms registry's
# (``gwtn_dist/arms.py``).


def _leaf_keys(tree: dict, prefix: str = "") -> set[str]:
    keys = set()
    for k, v in tree.items():
        if isinstance(v, dict) and v:
            keys |= _leaf_keys(v, f"{prefix}{k}.")
        else:
            keys.add(prefix + k)
    return keys


def tune_points(grid: dict) -> list[dict]:
    """The points of one arm's grid ``{key: [values]}``: every combination, in order."""
    points: list[dict] = [{}]
    for key, values in grid.items():
        points = [{**p, key: v} for p in points for v in values]
    return points


def regime_cells(cfg: Config) -> list[tuple[list[str], dict]]:
    """The cells of ``cfg.regime``: (a label per axis, the cell's overrides), in grid order."""
    cells: list[tuple[list[str], dict]] = [([], {})]
    for name, values in cfg.regime.axes.items():
        grown = []
        for labels, overrides in cells:
            for value in values:
                if isinstance(value, dict):
                    extra = {k: v for k, v in value.items() if k != "label"}
                    label = str(value.get("label", ",".join(str(v) for v in extra.values())))
                else:
                    label, extra = str(value), {name: value}
                grown.append(([*labels, label], {**overrides, **extra}))
        cells = grown
    return cells if cfg.regime.axes else []


def check_arms(cfg: Config) -> None:
    """``arms``: known arms, each once."""
    for arm in cfg.arms:
        if arm not in ARMS:
            raise ConfigError(f"arms: {arm!r} is not an arm; choose from {', '.join(ARMS)}")
    if len(set(cfg.arms)) != len(cfg.arms):
        raise ConfigError(f"arms: each arm once, got {cfg.arms}")


def check_regime_axes(cfg: Config) -> None:
    """``regime.axes``: one or two axes of values, each setting only keys a cell may set (that
    each cell's config then loads is ``validate``'s check)."""
    axes = cfg.regime.axes
    if not axes:
        return
    if len(axes) > 2:
        raise ConfigError(f"regime.axes: one or two axes (a table and a heat map), got "
                          f"{len(axes)}")
    known = _leaf_keys(to_dict(cfg))
    for name, values in axes.items():
        if not isinstance(values, list) or not values:
            raise ConfigError(f"regime.axes.{name}: expected a list of values, got {values!r}")
        for value in values:
            keys = [k for k in value if k != "label"] if isinstance(value, dict) else [name]
            for key in keys:
                if key not in known or key.startswith(("regime.", "run_dir", "compare.seeds")):
                    raise ConfigError(f"regime.axes.{name}: {key!r} is not a key a cell may set")


def check_compare(cfg: Config) -> None:
    """``compare``: paired seeds, budgets, headroom and the tuning grids."""
    c = cfg.compare
    if len(set(c.seeds)) != len(c.seeds):
        raise ConfigError(f"compare.seeds: seeds must differ, got {c.seeds}")
    if not c.budget_mults or any(not 0 < b < 100 for b in c.budget_mults):
        raise ConfigError(f"compare.budget_mults: positive multiples of the budget, got "
                          f"{c.budget_mults}")
    _positive("compare.headroom_min", c.headroom_min, allow_zero=True)
    if c.tune:
        _check_tune(cfg)


def _check_tune(cfg: Config) -> None:
    """``compare.tune``: a grid for every arm of ``arms``, all of one size, each point scored
    on a validation split with seeds that are never reported."""
    c = cfg.compare
    if not c.tune_seeds or set(c.tune_seeds) & set(c.seeds):
        raise ConfigError(f"compare.tune_seeds: tuning seeds are never reported seeds; got "
                          f"{c.tune_seeds} against compare.seeds {c.seeds}")
    # data/ builds on the schema, so this package imports it on use (at a grid's check only).
    from ..data.datasets import dataset_of

    if dataset_of(cfg).carved_val_samples(cfg) == 0:  # a carved validation split left empty
        raise ConfigError("compare.tune: choices are made on the validation split; set "
                          "data.val_samples > 0")
    known = _leaf_keys(to_dict(cfg))
    sizes = {}
    for arm in cfg.arms:
        if arm not in c.tune:
            raise ConfigError(f"compare.tune: every arm gets the same tuning effort; give "
                              f"{arm!r} a grid too (or drop it from arms)")
    for arm, grid in c.tune.items():  # grids of arms left out of `arms` are checked, unused
        _check_grid(arm, grid, known)
        if arm in cfg.arms:
            sizes[arm] = len(tune_points(grid))
    if len(set(sizes.values())) > 1:
        raise ConfigError(f"compare.tune: every arm gets the same tuning effort, but the grids "
                          f"have {sizes} points")


def _check_grid(arm: str, grid: dict, known: set[str]) -> None:
    """One arm's grid: lists of values for keys of the config that the arm may tune."""
    if arm not in ARMS:
        raise ConfigError(f"compare.tune.{arm}: {arm!r} is not an arm; choose from "
                          f"{', '.join(ARMS)}")
    if not isinstance(grid, dict) or not grid:
        raise ConfigError(f"compare.tune.{arm}: expected a mapping of dotted keys to lists "
                          f"of values, got {grid!r}")
    for key, values in grid.items():
        if key in BUDGET_KEYS:
            raise ConfigError(f"compare.tune.{arm}: {key} sets the thin-net budget, which "
                              f"every arm shares; it cannot be tuned per arm")
        if key not in known or not key.startswith(ARMS[arm].tunable):
            raise ConfigError(f"compare.tune.{arm}: {key!r} is not a key {arm} may tune; "
                              f"use one under {', '.join(ARMS[arm].tunable)}")
        if not isinstance(values, list) or not values:
            raise ConfigError(f"compare.tune.{arm}.{key}: expected a list of values, got "
                              f"{values!r}")
