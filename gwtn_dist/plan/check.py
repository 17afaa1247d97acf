"""``gwtn plan --check REHEARSAL``: the plan of a rehearsal's config and layout set against
what its ranks measured, stage by stage and rank by rank.

The rehearsal (``gwtn rehearse``) recorded every rank's resident peak of every stage; the plan
is made for the same config and overrides, on one node of as many CPU ranks, with the process
floor measured by ``plan.probe`` in a fresh process. Each cell is the measured peak, the
predicted one and their difference relative to the measurement; ``goal`` marks the cells within
``tolerance`` (15 %). The predicted peak's event and its largest terms say where a miss comes
from.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..config import ConfigError, load_config
from .planner import GiB, Layout, MiB, Plan, make_plan
from .probe import measure


def meminfo_bytes(field: str = "MemTotal") -> int:
    """``field`` of /proc/meminfo in bytes (0 where there is none)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def read_rehearsal(folder: Path) -> dict:
    path = folder / "rehearsal.json"
    if not path.is_file():
        raise ConfigError(f"--check: {path} not found; run `gwtn rehearse CONFIG --out "
                          f"{folder}` first")
    return json.loads(path.read_text())


def plan_of_rehearsal(record: dict, runtime_mb: tuple[float, float] | None = None) -> Plan:
    """The plan of the rehearsal's config on its layout (one node, ``ranks`` CPU ranks), the
    process floor (before the first step, after it; MiB) probed unless ``runtime_mb`` gives
    it."""
    cfg = load_config(record["config"], record["overrides"])
    ranks = record["ranks"]
    early, floor = runtime_mb or measure(record["config"], record["overrides"], ranks)
    layout = Layout(nodes=1, per_node=ranks, device="cpu", memory=meminfo_bytes(),
                    reserve=0, runtime=int(floor * MiB), runtime_early=int(early * MiB))
    return make_plan(cfg, layout, config_name=record["config"], seq_len=record.get("seq_len"))


def compare(record: dict, plan: Plan, tolerance: float = 0.15) -> list[dict]:
    """One row per stage and rank: measured and predicted peak (MiB), the relative error
    ((predicted − measured) / measured), whether it is within ``tolerance``, and the
    predicted peak's phase, event and largest terms."""
    rows = []
    for stage, measured in record["stages"].items():
        worst = plan.stage_peak(stage)
        predicted = worst.peak / MiB
        terms = sorted(((v, k) for k, v in worst.events[worst.peak_event].items()),
                       reverse=True)[:4]
        for rank, peak in enumerate(measured["peak_mb"]):
            error = (predicted - peak) / peak
            rows.append({"stage": stage, "rank": rank, "measured_mb": round(peak),
                         "predicted_mb": round(predicted), "error": round(error, 3),
                         "within": abs(error) <= tolerance, "phase": worst.name,
                         "event": worst.peak_event,
                         "terms": {k: round(v / MiB) for v, k in terms},
                         "wall_s": measured["wall_s"]})
    return rows


def check_table(config: str, ranks: int, rows: list[dict], tolerance: float = 0.15) -> str:
    """The comparison as Markdown rows (config and rank count in the first columns)."""
    lines = []
    for r in rows:
        mark = "yes" if r["within"] else "**no**"
        terms = ", ".join(f"{k} {v}" for k, v in r["terms"].items())
        lines.append(f"| {Path(config).stem} | {ranks} | {r['stage']} | {r['rank']} | "
                     f"{r['measured_mb']} | {r['predicted_mb']} | {r['error']:+.1%} | {mark} | "
                     f"{r['event']} ({r['phase']}): {terms} |")
    return "\n".join(lines)


HEADER = ("| config | ranks | stage | rank | measured MiB | predicted MiB | error | "
          "within 15% | predicted peak: event (phase): largest terms, MiB |\n"
          "|---|---:|---|---:|---:|---:|---:|---|---|")


def check(folder: Path, tolerance: float = 0.15) -> tuple[str, list[dict]]:
    """The comparison for the rehearsal in ``folder``: the table and its rows."""
    record = read_rehearsal(folder)
    plan = plan_of_rehearsal(record)
    rows = compare(record, plan, tolerance)
    runtime = plan.layout.runtime / MiB
    text = (f"{record['config']} on {record['ranks']} CPU rank(s), micro-batch "
            f"{record['micro_batch']}, {record['steps']} step(s) per phase; process floor "
            f"(probe) {runtime:.0f} MiB; memory {plan.layout.memory / GiB:.1f} GiB\n\n"
            + HEADER + "\n" + check_table(record["config"], record["ranks"], rows, tolerance))
    return text, rows
