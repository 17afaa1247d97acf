"""Tables and plots of what a run or a comparison produced."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

ARM_LABELS = {
    "win": "thin, Go Wide Then Narrow",
    "scratch": "thin from scratch",
    "kd": "thin, logit KD only",
    "deeper": "deeper thin from scratch",
    "wide": "wide twin (teacher)",
}


def format_run_table(records: dict, metric: str = "test_accuracy",
                     label: str = "test accuracy") -> str:
    """A markdown table of one run: the teacher, the method's nets, and any baselines, scored
    by ``metric`` (a key of each stage record), headed ``label``."""
    rows = [("wide twin (teacher)", records["wide"], records["wide"]["steps"])]
    imit = records["imitate"]
    rows.append(("thin after imitation", imit, imit["steps"]))
    rows.append(("thin, Go Wide Then Narrow", records["finetune"],
                 imit["steps"] + records["finetune"]["steps"]))
    for arm, rec in records.items():
        if arm not in ("wide", "imitate", "finetune"):
            rows.append((ARM_LABELS.get(arm, arm), rec, rec["steps"]))
    lines = [f"| net | params | steps | {label} | wall s |", "|---|---:|---:|---:|---:|"]
    for name, rec, steps in rows:
        lines.append(f"| {name} | {rec['params']:,} | {steps} | {rec[metric]:.4f} "
                     f"| {rec['wall_s']:.0f} |")
    return "\n".join(lines)


def mean_std(values: list[float]) -> tuple[float, float]:
    if not values:
        return float("nan"), float("nan")
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def read_curve(stage_dirs: list[Path], metric: str = "test_accuracy"
               ) -> list[tuple[int, float]]:
    """(thin-net step, ``metric``) points logged by the stages in ``stage_dirs``, in order.

    An imitation stage logs no accuracy per step; its finished net's score is its one point.
    """
    points = []
    for stage_dir in stage_dirs:
        if stage_dir.name == "imitate" and (stage_dir / "stage.json").is_file():
            rec = json.loads((stage_dir / "stage.json").read_text())
            points.append((rec["steps"], rec[metric]))
            continue
        path = stage_dir / "metrics.jsonl"
        if not path.is_file():
            continue
        for line in path.read_text().splitlines():
            rec = json.loads(line)
            if metric in rec:
                points.append((rec["global_step"], rec[metric]))
    return points


def write_compare(out_dir: Path, table: dict, curves: dict[str, list[list[tuple[int, float]]]],
                  header: str) -> None:
    """Write compare.json, compare.md and compare.png into ``out_dir``."""
    (out_dir / "compare.json").write_text(json.dumps(table, indent=2))
    label = table.get("metric_label", "test accuracy")
    secondary = table.get("secondary", [])
    extra_cols = "".join(f" {name} (mean ± std) |" for name in secondary)
    lines = [
        header,
        "",
        (f"| arm | params | thin-net steps | {label} (mean ± std) |{extra_cols} seeds "
        f"| wall s / seed |"),
        "|---|---:|---:|---:|" + "---:|" * len(secondary) + "---:|---:|",
    ]
    for arm, row in table["arms"].items():
        extra = "".join(f" {row[n]['mean']:.2f} ± {row[n]['std']:.2f} |" for n in secondary)
        lines.append(
            f"| {ARM_LABELS.get(arm, arm)} | {row['params']:,} | {row['steps']} | "
            f"{row['mean']:.4f} ± {row['std']:.4f} |{extra} {len(row['per_seed'])} | "
            f"{row['wall_s_mean']:.0f} |"
        )
    t = table.get("teacher")
    if t:
        spread = (f"{t['mean']:.4f} (one teacher shared by all seeds)" if t.get("shared")
                  else f"{t['mean']:.4f} ± {t['std']:.4f} (one teacher per seed)")
        extra = "".join(f", {n} {t[n]['mean']:.2f}" for n in secondary)
        teacher = (f"Wide teacher (cost not counted in the thin-net budget): "
                   f"{t['params']:,} params, {t['steps']} steps, {label} {spread}{extra}, "
                   f"{t['wall_s_mean']:.0f} s of training per teacher.")
        lines += ["", teacher]
    (out_dir / "compare.md").write_text("\n".join(lines) + "\n")
    plot_curves(out_dir / "compare.png", curves, table,
                teacher_accuracy=t["mean"] if t else None, label=label)


def plot_curves(path: Path, curves: dict[str, list[list[tuple[int, float]]]],
                table: dict, teacher_accuracy: float | None = None,
                label: str = "test accuracy") -> None:
    """``label`` (test accuracy, or held-out MLM accuracy) against thin-net steps, one line per
    arm (mean over seeds, band = min..max).

    The wide teacher's final accuracy, if given, is a dashed line for reference.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for arm, per_seed in curves.items():
        per_seed = [c for c in per_seed if c]
        if not per_seed:
            continue
        steps = sorted({s for c in per_seed for s, _ in c})
        by_step = [[acc for c in per_seed for s2, acc in c if s2 == s] for s in steps]
        mean = [statistics.fmean(v) for v in by_step]
        ax.plot(steps, mean, marker=".", label=ARM_LABELS.get(arm, arm))
        ax.fill_between(steps, [min(v) for v in by_step], [max(v) for v in by_step], alpha=0.15)
    if teacher_accuracy is not None:
        ax.axhline(teacher_accuracy, color="grey", linestyle="--", linewidth=1,
                   label=f"wide twin (teacher), {teacher_accuracy:.3f}")
    ax.set_xlabel("thin-net training steps")
    ax.set_ylabel(label)
    ax.set_title(table.get("title", "accuracy vs thin-net steps"))
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
