"""Tables and plots of what a run or a comparison produced."""

from __future__ import annotations

import json
import os
import statistics
from pathlib import Path

from .arms import ARMS


def arm_label(name: str) -> str:
    """An arm's row label in reports (the registered arm's; ``wide``: the teacher)."""
    if name == "wide":
        return "wide twin (teacher)"
    return ARMS[name].label if name in ARMS else name


def format_run_table(records: dict, metric: str = "test_accuracy",
                     label: str = "test accuracy", select: str | None = None,
                     labels: dict[str, str] | None = None) -> str:
    """A markdown table of one run: the teacher, the method's nets, and any baselines, scored
    by ``metric`` (a key of each stage record), headed ``label``; with ``select`` (the
    validation metric) a column of it first (``labels``: the task's words for metrics)."""
    rows = [("wide twin (teacher)", records["wide"], records["wide"]["steps"])]
    imit = records["imitate"]
    rows.append(("thin after imitation", imit, imit["steps"]))
    rows.append(("thin, Go Wide Then Narrow", records["finetune"],
                 imit["steps"] + records["finetune"]["steps"]))
    for arm, rec in records.items():
        if arm not in ("wide", "imitate", "finetune"):
            rows.append((arm_label(arm), rec, rec["steps"]))
    val = select if select and select != metric else None
    val_head = f" {_label(val, {'labels': labels or {}})} |" if val else ""
    lines = [f"| net | params | steps |{val_head} {label} | wall s |",
             "|---|---:|---:|" + ("---:|" if val else "") + "---:|---:|"]
    for name, rec, steps in rows:
        val_cell = f" {rec[val]:.4f} |" if val else ""
        lines.append(f"| {name} | {rec['params']:,} | {steps} |{val_cell} {rec[metric]:.4f} "
                     f"| {rec['wall_s']:.0f} |")
    return "\n".join(lines)


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


def atomic_write(path: Path, text: str) -> None:
    """Write ``text`` so that a reader (or a second worker) never sees half a file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


def _ms(cell: dict, digits: int = 4) -> str:
    return f"{cell['mean']:.{digits}f} ± {cell['std']:.{digits}f}"


def _label(metric: str, table: dict | None = None) -> str:
    """Words for ``metric``: the task's own (``labels`` of the table, from ``task.labels``),
    else the name with spaces."""
    own = (table or {}).get("labels", {})
    return own.get(metric) or metric.replace("_", " ")


def _tuning_lines(table: dict) -> list[str]:
    tuning = table["tuning"]
    if not any(t["points"] for t in tuning.values()):
        return ["No tuning grid (`compare.tune`): every arm ran its configured recipe."]
    lines = [(f"Tuning (seeds {table['tune_seeds']}, never reported; scored on "
             f"{_label(next(t['metric'] for t in tuning.values() if t['points']), table)}):"),
             "",
             "| arm | point | validation score | chosen |", "|---|---|---:|:---:|"]
    for arm, t in tuning.items():
        for row in t["points"]:
            point = ", ".join(f"{k}={v}" for k, v in row["point"].items())
            lines.append(f"| {arm_label(arm)} | {point} | {row['score']:.4f} | "
                         f"{'✓' if row['chosen'] else ''} |")
    return lines


def _results_lines(table: dict, budget: dict) -> list[str]:
    sel, metric = table["select_metric"], table["metric"]
    cols = [sel] if sel == metric else [sel, metric]
    cols += table.get("secondary", [])
    head = "".join(f" {_label(c, table)} (mean ± sd) |" for c in cols)
    lines = [(f"| arm | params | thin-net steps |{head} {_label(metric, table)} per seed "
              "| wall s / seed |"),
             "|---|---:|---:|" + "---:|" * len(cols) + "---|---:|"]
    for arm, row in budget["arms"].items():
        digits = table.get("digits", {})  # the task's, per metric (4 unless it says)
        cells = "".join(f" {_ms(row[c], digits.get(c, 4))} |" for c in cols)
        seeds = ", ".join(f"{v:.4f}" for v in row["per_seed"].values())
        lines.append(f"| {arm_label(arm)} | {row['params']:,} | {row['steps']} |"
                     f"{cells} {seeds} | {row['wall_s_mean']:.0f} |")
    return lines


def _paired_lines(table: dict, budget: dict) -> list[str]:
    if not budget["paired"]:
        return []
    name = _label(table["metric"], table)
    lines = [f"Paired differences of {name} (arm − reference, per seed):", "",
             "| arm − reference | per seed | mean ± sd | ahead on | verdict |",
             "|---|---|---:|---:|---|"]
    for key, diff in budget["paired"].items():
        arm, ref = key.split("-")
        seeds = ", ".join(f"{d:+.4f}" for d in diff["per_seed"].values())
        verdict = "**pays**" if budget["verdicts"][key] else "does not pay"
        lines.append(f"| {arm_label(arm)} − {arm_label(ref)} | {seeds} | "
                     f"{diff['mean']:+.4f} ± {diff['sd']:.4f} | {diff['wins']}/{diff['seeds']} "
                     f"| {verdict} |")
    return lines


def _verdict_lines(budget: dict) -> list[str]:
    lines = []
    for key, ok in budget["verdicts"].items():
        arm, ref = key.split("-")
        d = budget["paired"][key]
        lines.append(f"- **Verdict, {arm_label(arm)} vs {arm_label(ref)}** "
                     f"(×{budget['budget_mult']:g} budget): {d['mean']:+.4f} ± {d['sd']:.4f}, "
                     f"ahead on {d['wins']}/{d['seeds']} seeds — "
                     f"{'PAYS' if ok else 'does NOT pay'}.")
    return lines


def _after_imitation_lines(table: dict, budget: dict) -> list[str]:
    after = budget.get("after_imitation")
    if not after:
        return []
    sel, metric = table["select_metric"], table["metric"]
    cols = [sel] if sel == metric else [sel, metric]
    heads = "".join(f" {_label(c, table)} |" for c in cols)
    lines = ["The method's thin net straight after imitation (before fine-tuning):", "",
             f"| seed |{heads} relative imitation error per point |",
             "|---|" + "---:|" * len(cols) + "---|"]
    for seed, rec in after.items():
        errors = ", ".join(f"{p} {e:.3f}" for p, e in rec.get("relative_error", {}).items())
        cells = "".join(f" {rec.get(c, float('nan')):.4f} |" for c in cols)
        lines.append(f"| {seed} |{cells} {errors} |")
    short = {seed: rec["health"] for seed, rec in after.items()
             if "health" in rec and not rec["health"]["reached"]}
    if short:
        worst = max(h["max_relative_error"] for h in short.values())
        threshold = next(iter(short.values()))["threshold"]
        lines += ["", (f"**Warning: the warm start did not reach the teacher** on seed"
                       f"{'s' if len(short) > 1 else ''} {', '.join(short)} (a point's relative "
                       f"error up to {worst:.3f}, above imitate.health_max_error {threshold:g}): "
                       f"the method cannot be judged from this comparison.")]
    return lines


def _teacher_lines(table: dict) -> list[str]:
    t = table["teacher"]
    sel = table["select_metric"]
    spread = (f"{t[sel]['mean']:.4f} (one teacher shared by all seeds)" if t.get("shared")
              else f"{_ms(t[sel])} (one teacher per seed)")
    cost = (f", about {t['thin_step_equivalents']:,} thin-net steps' worth of time"
            if "thin_step_equivalents" in t else "")
    cached = (f" It was copied from the teacher cache ({', '.join(t['from_cache'])}); its "
              f"training time is the cached run's.") if t.get("from_cache") else ""
    total = (f" {t['teachers_trained']} teachers, {t['teacher_wall_s_total']:.0f} s in all."
             if t.get("teachers_trained", 1) > 1 else "")
    lines = [(f"Wide teacher (its cost is apart from the thin-net budget): {t['params']:,} "
             f"params, {t['steps']} steps, {_label(sel, table)} {spread}, "
             f"{_label(table['metric'], table)} "
             f"{t['mean']:.4f}; {t['wall_s_mean']:.0f} s of training per teacher{cost}.{cached}"
              f"{total}")]
    head = t.get("headroom")
    if head and not head["clear"]:
        lines += ["", (f"**Warning: the teacher is not clearly better than the thin net from "
                      f"scratch** ({_label(head['metric'], table)} {head['value']:+.4f}, less "
                      f"than the "
                      f"{head['needed']:.4f} asked for): there is little for imitation or "
                      f"distillation to transfer, so a loss or a tie here says little about the "
                      f"method.")]
    elif head:
        lines += ["", (f"Teacher headroom over the thin net from scratch: {head['value']:+.4f} "
                      f"{_label(head['metric'], table)} (at least {head['needed']:.4f} asked "
                      f"for).")]
    return lines


def _budgets_side_by_side(table: dict) -> list[str]:
    budgets = table["budgets"]
    if len(budgets) < 2:
        return []
    heads = "".join(f" ×{b['budget_mult']:g} ({b['budget_steps']} steps) |" for b in budgets)
    name = _label(table["metric"], table)
    lines = [f"Head start or lasting gain: {name} (mean ± sd) at each budget",
             "", f"| arm |{heads}", "|---|" + "---:|" * len(budgets)]
    for arm in budgets[0]["arms"]:
        cells = "".join(f" {_ms(b['arms'][arm])} |" for b in budgets)
        lines.append(f"| {arm_label(arm)} |{cells}")
    return lines


def compare_markdown(table: dict) -> str:
    """compare.md: the protocol and criterion first, then tuning, results, paired
    differences, verdicts, the net after imitation, the teacher and budgets side by side."""
    seeds = table["seeds"]
    val = (f"a validation split of {table['val_samples']:,} training images (never trained "
           f"on)" if table.get("val_samples") else table.get("validation") or "the held-out split")
    if table.get("separate_test", True):
        protocol = (f"every choice is made on {val}; the test split is read only for this "
                    f"report.")
    else:  # token shards written before `--test-every`, or an image folder
        protocol = ("these shards hold one held-out split, read for every choice and for this "
                    "report alike (token shards: rewrite them with `gwtn shards text|wikipedia "
                    "--test-every N` for a test split).")
    lines = [(f"# Go Wide, Then Narrow vs baselines — {table['title']}, {len(seeds)} "
             f"reported seed(s) {seeds}"), "",
             (f"Protocol: {protocol} Seeds are paired (every arm runs every seed). Criterion, "
              f"fixed before the numbers: {table['criterion']}"), ""]
    lines += _tuning_lines(table) + [""]
    for budget in table["budgets"]:
        lines += [(f"## Thin-net budget ×{budget['budget_mult']:g}: {budget['budget_steps']} "
                  f"steps"), ""]
        lines += _results_lines(table, budget) + [""]
        lines += _paired_lines(table, budget) + [""]
        lines += _verdict_lines(budget) + [""]
        lines += _after_imitation_lines(table, budget) + [""]
    lines += _teacher_lines(table) + [""]
    lines += _budgets_side_by_side(table)
    return "\n".join(lines).rstrip() + "\n"


def write_compare(out_dir: Path, table: dict, curves: dict[str, list[list[tuple[int, float]]]]
                  ) -> None:
    """Write compare.json, compare.md and compare.png into ``out_dir`` (atomically, so two
    workers finishing together leave whole files)."""
    atomic_write(out_dir / "compare.json", json.dumps(table, indent=2))
    atomic_write(out_dir / "compare.md", compare_markdown(table))
    t = table["teacher"]
    sel = table["select_metric"]
    tmp = out_dir / f".compare.{os.getpid()}.png"
    plot_curves(tmp, curves, table, teacher_accuracy=t[sel]["mean"], label=_label(sel, table))
    tmp.replace(out_dir / "compare.png")


def plot_curves(path: Path, curves: dict[str, list[list[tuple[int, float]]]],
                table: dict, teacher_accuracy: float | None = None,
                label: str = "test accuracy") -> list[str]:
    """``label`` (test accuracy, or held-out MLM accuracy) against thin-net steps, one line per
    arm (mean over seeds, band = min..max); returns the legend's labels.

    A key ``"<arm>@x<m>"`` is that arm at ``m`` × the thin-net budget
    (``compare.budget_mults``): drawn dotted, in its arm's colour, so a head start that the
    longer run catches up with shows as lines that meet. The wide teacher's final accuracy, if
    given, is a grey dashed line for reference.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    colours: dict[str, str] = {}
    for key, per_seed in curves.items():
        arm, _, mult = key.partition("@x")
        colour = colours.setdefault(arm, f"C{len(colours)}")
        per_seed = [c for c in per_seed if c]
        if not per_seed:
            continue
        steps = sorted({s for c in per_seed for s, _ in c})
        by_step = [[acc for c in per_seed for s2, acc in c if s2 == s] for s in steps]
        mean = [statistics.fmean(v) for v in by_step]
        name = arm_label(arm) + (f" (×{mult} budget)" if mult else "")
        ax.plot(steps, mean, marker=".", color=colour, linestyle=":" if mult else "-",
                label=name)
        ax.fill_between(steps, [min(v) for v in by_step], [max(v) for v in by_step],
                        color=colour, alpha=0.15)
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
    legend = ax.get_legend()
    labels = [text.get_text() for text in legend.get_texts()] if legend else []
    plt.close(fig)
    return labels
