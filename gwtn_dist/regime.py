"""``gwtn regime``: where the method pays — a grid of complete comparisons, and a heat map of
the method's paired gain over the thin net from scratch.

Each cell of ``regime.axes`` (e.g. thin depth × training-set size) is one ``gwtn compare`` with
the cell's overrides, under ``run_dir/regime/<cell>/compare/``: its own teacher, tuning grid and
seeds, so every cell is judged by the same protocol. The cells' units form one list, taken in
order by every worker (``resume=true``) as far as their dependencies allow, so a worker never
waits on one cell's teacher while another cell has work; a long grid can be run in chunks.
The summary is ``run_dir/regime/regime.{md,json,png}``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from pathlib import Path
from typing import NamedTuple

import numpy as np

from .compare import ComparePlan, plan_compare, report_compare
from .config import Config, RegimeConfig, regime_cells, with_overrides
from .distributed.runtime import Runtime
from .pipeline import prepare_run_dir
from .report import arm_label, atomic_write
from .stages.teacher_cache import cache_dir
from .workers import Unit, run_units

log = logging.getLogger("gwtn")


def cell_name(labels: list[str]) -> str:
    """A folder name for a cell: its labels, filesystem-safe."""
    safe = ["".join(c if c.isalnum() or c in "._-" else "_" for c in label) for label in labels]
    return "__".join(safe)


class Cell(NamedTuple):
    """One cell of the grid: its folder name, axis labels, overrides and planned comparison."""

    name: str
    labels: list[str]
    overrides: dict
    plan: ComparePlan


def regime(rt: Runtime, cfg: Config) -> dict:
    """Run every cell's comparison, then write the regime table, JSON and heat map."""
    out = prepare_run_dir(rt, cfg, Path(cfg.run_dir) / "regime", exclusive=False)
    cells = plan_cells(rt, cfg, out)
    run_units(rt, regime_units(cells))
    rows = []
    for cell in cells:
        log.info("regime: cell %s (%s)", cell.name, cell.overrides)
        table = report_compare(cell.plan)
        budget = table["budgets"][0]
        rows.append({"labels": cell.labels, "overrides": cell.overrides, "cell": cell.name,
                     "arms": {a: {"mean": r["mean"], "std": r["std"]}
                              for a, r in table["arms"].items()},
                     "paired": budget["paired"], "verdicts": budget["verdicts"],
                     "teacher": {"mean": table["teacher"]["mean"],
                                 "headroom": table["teacher"].get("headroom")}})
    summary = {"axes": list(cfg.regime.axes), "metric": table["metric"], "cells": rows}
    if rt.is_main:
        atomic_write(out / "regime.json", json.dumps(summary, indent=2))
        atomic_write(out / "regime.md", regime_markdown(summary))
        plot_regime(out / "regime.png", summary)
        print((out / "regime.md").read_text())
    return summary


def plan_cells(rt: Runtime, cfg: Config, out: Path) -> list[Cell]:
    """Every cell's comparison, planned (its folder checked or created) under ``out``."""
    base = dataclasses.replace(cfg, regime=RegimeConfig())
    cells = []
    for labels, overrides in regime_cells(cfg):
        name = cell_name(labels)
        # resume=true: the regime folder's guard already decided whether this command may
        # continue; a cell another worker started first is the same run, not a clash.
        ccfg = with_overrides(base, {**overrides, "run_dir": str(out / name), "resume": True})
        cells.append(Cell(name, labels, overrides, plan_compare(rt, ccfg)))
    return cells


def regime_units(cells: list[Cell]) -> list[Unit]:
    """Every cell's units as one list, names prefixed by the cell, cells in order.

    One list rather than one comparison after another: a worker with nothing left to take in a
    cell (its last units held by another worker, or waiting for a teacher another worker
    trains) takes the next cell's work instead of waiting. A teacher that an earlier cell's
    teacher unit also trains (the same ``wide.cache`` key: cells that differ only downstream of
    the teacher) waits for that one and is then copied from the cache rather than trained twice
    at once."""
    units, first_with_key = [], {}
    for cell in cells:
        plan = cell.plan
        teachers = {plan.teacher_unit(s): cache_dir(plan.teacher_cfg(s))
                    for s in plan.teacher_seeds()}
        for unit in plan.units():
            name = f"{cell.name}/{unit.name}"
            needs = [f"{cell.name}/{n}" for n in unit.needs]
            key = teachers.get(unit.name)
            if key is not None:  # None: not a teacher, or no cache to share through
                first = first_with_key.setdefault(key, name)
                if first != name:
                    needs.append(first)
            units.append(dataclasses.replace(unit, name=name, needs=needs))
    return units


def regime_markdown(summary: dict) -> str:
    """One row per cell: every arm's mean, the method's paired gain over scratch (and over the
    deeper net) with its verdict, and the teacher's headroom."""
    axes, cells = summary["axes"], summary["cells"]
    arms = list(cells[0]["arms"])
    head = " | ".join(axes + [arm_label(a) for a in arms])
    lines = [f"# Where the method pays — {summary['metric'].replace('_', ' ')}", "",
             f"| {head} | WIN − scratch (mean ± sd, wins) | WIN − deeper | teacher headroom |",
             "|" + "---|" * len(axes) + "---:|" * len(arms) + "---|---|---:|"]
    for cell in cells:
        values = " | ".join(f"{cell['arms'][a]['mean']:.4f}" for a in arms)
        head = cell["teacher"].get("headroom") or {}
        lines.append(f"| {' | '.join(cell['labels'])} | {values} | "
                     f"{_gain(cell, 'win-scratch')} | {_gain(cell, 'win-deeper')} | "
                     f"{head.get('value', float('nan')):+.4f} |")
    return "\n".join(lines) + "\n"


def _gain(cell: dict, key: str) -> str:
    d = cell["paired"].get(key)
    if d is None:
        return "—"
    verdict = "pays" if cell["verdicts"][key] else "does not pay"
    return f"{d['mean']:+.4f} ± {d['sd']:.4f}, {d['wins']}/{d['seeds']}: {verdict}"


def gain_grid(summary: dict) -> tuple[list[str], list[str], np.ndarray, dict]:
    """The heat map's content: row and column labels, the method's mean paired gain over
    scratch per cell (rows × cols; NaN where a combination has no such pair, e.g. a cell not
    run), and the words printed in each cell."""
    cells, axes = summary["cells"], summary["axes"]
    rows = list(dict.fromkeys(c["labels"][0] for c in cells))
    cols = list(dict.fromkeys(c["labels"][1] for c in cells)) if len(axes) > 1 else [""]
    gain = np.full((len(rows), len(cols)), np.nan)
    # (row, col) → "mean\n± sd\nwins/seeds": what a reader needs to judge a colour; a blank
    # cell would read as a zero gain on this colour scale, so an empty one says so.
    words = {(i, j): "not\nmeasured" for i in range(len(rows)) for j in range(len(cols))}
    for c in cells:
        d = c["paired"].get("win-scratch")
        if d is not None:
            i, j = rows.index(c["labels"][0]), cols.index(c["labels"][1]) if len(axes) > 1 else 0
            gain[i, j] = d["mean"]
            words[i, j] = f"{d['mean']:+.4f}\n± {d['sd']:.4f}\n{d['wins']}/{d['seeds']} ahead"
    return rows, cols, gain, words


def plot_regime(path: Path, summary: dict) -> None:
    """A heat map of the method's mean paired gain over scratch per cell (one axis: a row);
    combinations without a gain are grey and say "not measured"."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    axes = summary["axes"]
    rows, cols, gain, words = gain_grid(summary)
    # At least 6.5 in wide, so that a one-column map still has room for its colour bar and
    # title; aspect "auto" lets the cells stretch instead of leaving a thin square strip.
    fig, ax = plt.subplots(figsize=(max(6.5, 1.8 * len(cols) + 3), 1.0 * len(rows) + 2))
    bound = np.nanmax(np.abs(gain)) if np.isfinite(gain).any() else 1.0
    cmap = plt.get_cmap("RdBu").with_extremes(bad="lightgrey")
    image = ax.imshow(gain, cmap=cmap, vmin=-bound, vmax=bound, aspect="auto")
    for (i, j), text in words.items():
        dark = abs(gain[i, j]) > 0.6 * bound  # white text on the deep colours (False for NaN)
        ax.text(j, i, text, ha="center", va="center", fontsize=9,
                color="white" if dark else "black")
    ax.set_yticks(range(len(rows)), rows)
    ax.set_xticks(range(len(cols)), cols)
    ax.set_ylabel(axes[0])
    if len(axes) > 1:
        ax.set_xlabel(axes[1])
    ax.set_title(f"method − scratch, {summary['metric'].replace('_', ' ')}\n"
                 f"(paired mean ± sd over seeds; seeds where the method is ahead)")
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.{os.getpid()}.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)
