"""Paired statistics over seeds, and the verdict of an arm against a criterion fixed in advance.

Every arm of ``gwtn compare`` runs the same seeds, so an arm is judged by its per-seed
differences from a reference arm (thin from scratch), not by two overlapping spreads.
"""

from __future__ import annotations

import statistics

# The criterion, stated before any number is read (docs/protocol.md).
CRITERION = (
    "an arm pays when its mean paired gain over the reference exceeds 2 sd of the paired "
    "differences and it wins on every seed; the method must also reach logit KD's mean."
)


def mean_sd(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value; nan for none)."""
    if not values:
        return float("nan"), float("nan")
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def paired(arm: dict[str, float], reference: dict[str, float]) -> dict:
    """Per-seed differences ``arm − reference`` over the seeds both have, their mean and sd,
    and the count of seeds where the arm is ahead."""
    seeds = [s for s in arm if s in reference]
    diffs = {s: arm[s] - reference[s] for s in seeds}
    mean, sd = mean_sd(list(diffs.values()))
    return {"per_seed": diffs, "mean": mean, "sd": sd, "wins": sum(d > 0 for d in diffs.values()),
            "seeds": len(seeds)}


def pays(diff: dict, arm_mean: float | None = None, kd_mean: float | None = None) -> bool:
    """The criterion on one paired comparison: mean gain > 2 sd and a win on every seed, and,
    when ``kd_mean`` is given, ``arm_mean`` at least logit KD's mean."""
    ok = diff["seeds"] > 0 and diff["mean"] > 2 * diff["sd"] and diff["wins"] == diff["seeds"]
    if kd_mean is not None and arm_mean is not None:
        ok = ok and arm_mean >= kd_mean
    return ok


def verdict_line(name: str, reference: str, diff: dict, ok: bool) -> str:
    """One sentence: the arm, the paired gain (mean ± sd, wins) and whether it pays."""
    gain = (f"{diff['mean']:+.4f} ± {diff['sd']:.4f} over {reference}, ahead on "
            f"{diff['wins']}/{diff['seeds']} seeds")
    return f"{name}: {gain} — {'PAYS' if ok else 'does not pay'} by the criterion."
