"""The plan against measurement: rehearse configs at several rank counts and set every stage's
measured peak per rank against ``gwtn plan``'s, in one Markdown table.

    python benchmarks/plan_check.py --out runs/plan_check \\
        configs/tiny_cpu.yaml:1 configs/tiny_cpu.yaml:2 \\
        "configs/imagenet_resnet50.yaml:4:--micro-batch=1"

Each argument is ``CONFIG:RANKS[:REHEARSE_OPTION,…]`` (options of ``gwtn rehearse``, such as
``--micro-batch=1``, or dotted overrides, comma-separated). Runs one rehearsal at a time,
niced (they share the machine), in ``OUT/<config>-<ranks>``, reusing a finished one (delete
its folder to run it again; ``--plan-only`` never runs one), then ``gwtn plan --check`` on it.
Prints the table and writes it, with every row as JSON, to ``OUT/plan_check.{md,json}``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from gwtn_dist.plan.check import (
    HEADER,
    check_table,
    compare,
    plan_of_rehearsal,
    read_rehearsal,
)


def parse(spec: str) -> tuple[str, int, list[str]]:
    config, ranks, *rest = spec.split(":", 2)
    extra = [a for a in rest[0].split(",") if a] if rest else []
    return config, int(ranks), extra


def rehearse(config: str, ranks: int, extra: list[str], folder: Path) -> str | None:
    """Run the rehearsal; None when it ran, else the one line it ended with (a layout the
    plan refuses on this machine, or a failed stage)."""
    options = [a for a in extra if a.startswith("--")]
    overrides = [a for a in extra if not a.startswith("--")]
    command = ["nice", "-n", "10", sys.executable, "-m", "gwtn_dist", "rehearse", config,
               *overrides, "--ranks", str(ranks), "--out", str(folder), *options]
    print("$", " ".join(command), flush=True)
    proc = subprocess.run(command, cwd=REPO, env={**os.environ, "PYTHONWARNINGS": "ignore"},
                          stderr=subprocess.PIPE, text=True, check=False)
    if proc.returncode == 0:
        return None
    lines = proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "refused.txt").write_text(lines[-1] + "\n")
    return lines[-1]


def wall_table(walls: list[tuple[str, int, dict]]) -> str:
    """Wall time of every stage's launch (start-up, training, saving, the final evaluation)
    and of its training loop alone, in seconds, per rehearsal."""
    stages = list(dict.fromkeys(s for _, _, r in walls for s in r["stages"]))
    lines = ["| config | ranks | micro-batch | steps | " + " | ".join(stages) + " |",
             "|---|---:|---:|---:|" + "---:|" * len(stages)]
    for name, ranks, r in walls:
        cells = [f"{r['stages'][s]['wall_s']:.0f} ({r['stages'][s]['loop_s'] or 0:.0f})"
                 if s in r["stages"] else "-" for s in stages]
        lines.append(f"| {name} | {ranks} | {r['micro_batch']} | {r['steps']} | "
                     + " | ".join(cells) + " |")
    return "Wall time per stage, s (training loop alone in brackets):\n\n" + "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="CONFIG:RANKS[:OPTION,…]")
    parser.add_argument("--out", default="runs/plan_check")
    parser.add_argument("--plan-only", action="store_true",
                        help="only compare rehearsals already in OUT")
    args = parser.parse_args(argv)
    out = Path(args.out)
    lines, everything, walls = [HEADER], [], []
    for spec in args.runs:
        config, ranks, extra = parse(spec)
        # Runs with overrides get their own folder: e.g. …-4-widezerostage3.
        slug = "".join("-" + re.sub(r"[^A-Za-z0-9]+", "", o.split(".")[-1])
                       for o in extra if not o.startswith("--"))
        folder = out / f"{Path(config).stem}-{ranks}{slug}"
        done = (folder / "rehearsal.json").is_file() and len(
            read_rehearsal(folder)["stages"]) >= 3
        refused = (folder / "refused.txt").read_text().strip() \
            if (folder / "refused.txt").is_file() else None
        if not done and not refused and not args.plan_only:
            refused = rehearse(config, ranks, extra, folder)
        if refused:
            lines.append(f"| {Path(config).stem}{slug} | {ranks} | - | - | - | - | - | - | "
                         f"not run: {refused.replace('|', '/')} |")
            everything.append({"config": config, "ranks": ranks, "refused": refused})
            print(lines[-1], flush=True)
            continue
        if not (folder / "rehearsal.json").is_file():
            print(f"{folder}: no rehearsal, left out", flush=True)
            continue
        record = read_rehearsal(folder)
        walls.append((Path(config).stem + slug, ranks, record))
        rows = compare(record, plan_of_rehearsal(record))
        lines.append(check_table(Path(config).stem + slug, ranks, rows))
        everything += [{"config": config, "ranks": ranks, **r} for r in rows]
        print(lines[-1], flush=True)
    text = "\n".join(lines) + "\n\n" + wall_table(walls) + "\n"
    out.mkdir(parents=True, exist_ok=True)
    (out / "plan_check.md").write_text(text)
    (out / "plan_check.json").write_text(json.dumps(everything, indent=1))
    print(text)


if __name__ == "__main__":
    main()
