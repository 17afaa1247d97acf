"""``gwtn profile RUN_DIR``: where the training steps of a run spent their time.

Reads the per-region breakdown that every finished phase stores in ``<stage>/stage.json``
(``phases[i].breakdown``: per rank, the mean ms per region of its sampled steps; see
``gwtn_dist/profiling.py``), prints one table row per phase and rank — each region's ms per step
and share of the step — and draws ``RUN_DIR/profile.png``, a stacked bar per phase and rank.
Stages are found in the run folder itself and, for a comparison, in every unit's folder below
it.
"""

from __future__ import annotations

import json
from pathlib import Path

from .config import ConfigError
from .profiling import REGIONS


def phase_rows(run_dir: Path) -> list[dict]:
    """One row per (stage folder, phase, rank) that has a breakdown, in path order."""
    rows = []
    for record in sorted(run_dir.rglob("stage.json")):
        try:
            phases = json.loads(record.read_text()).get("phases", [])
        except (OSError, json.JSONDecodeError):
            continue  # a stage being written: nothing to show yet
        where = record.parent.relative_to(run_dir).as_posix()
        for phase in phases:
            for rank, part in enumerate(phase.get("breakdown") or []):
                if part:
                    rows.append({"stage": where, "phase": phase["name"], "rank": rank, **part})
    return rows


def profile_table(rows: list[dict]) -> str:
    """A Markdown table: ms per step per region, the share of the step in brackets."""
    head = ("| stage folder | phase | rank | sampled | step ms | "
            + " | ".join(r.replace("_", " ") for r in REGIONS) + " | unaccounted |")
    lines = [head, "|" + "---|" * 3 + "---:|" * (len(REGIONS) + 3)]
    for row in rows:
        step = row["step_ms"]
        parts = [row["regions"].get(r, 0.0) for r in REGIONS]
        cells = " | ".join(f"{ms:.1f} ({ms / step:.0%})" if step else f"{ms:.1f}"
                           for ms in parts)
        rest = step - sum(parts)
        lines.append(f"| {row['stage']} | {row['phase']} | {row['rank']} | "
                     f"{row['sampled_steps']} | {step:.1f} | {cells} | {rest:.1f} |")
    return "\n".join(lines)


def profile_plot(rows: list[dict], path: Path) -> None:
    """Stacked horizontal bars of ms per step by region, one bar per phase and rank."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r['stage']} · {r['phase'].split('/')[-1]} · r{r['rank']}" for r in rows]
    fig, ax = plt.subplots(figsize=(10, 1.2 + 0.35 * len(rows)))
    left = [0.0] * len(rows)
    for region in REGIONS:
        widths = [r["regions"].get(region, 0.0) for r in rows]
        ax.barh(labels, widths, left=left, label=region.replace("_", " "))
        left = [a + b for a, b in zip(left, widths, strict=True)]
    ax.invert_yaxis()
    ax.set_xlabel("ms per training step (mean of the sampled steps)")
    ax.legend(ncol=4, fontsize=8, loc="upper center",
              bbox_to_anchor=(0.5, -0.12 - 0.6 / len(rows)))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def profile(run_dir: Path) -> tuple[str, Path]:
    """The table of ``run_dir`` and the plot written to ``run_dir/profile.png``."""
    if not run_dir.is_dir():
        raise ConfigError(f"{run_dir}: no such run folder")
    rows = phase_rows(run_dir)
    if not rows:
        raise ConfigError(f"{run_dir}: no finished phase with a breakdown (runs sample steps "
                          f"for it when profile.sample_every > 0, the default)")
    path = run_dir / "profile.png"
    profile_plot(rows, path)
    return profile_table(rows), path
