"""The measuring protocol of `gwtn compare`: a validation split carved out of the training data,
tuning that chooses on it and never reads the test split, paired statistics and verdicts, two
workers sharing one comparison, and the teacher cache."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import threading
import time
from collections import Counter

import pytest
import torch
import yaml

import gwtn_dist.compare as compare_module
import gwtn_dist.models.task as tasks_module
import gwtn_dist.regime as regime_module
from gwtn_dist.cli import main
from gwtn_dist.config import load_config
from gwtn_dist.data.shards import eval_batches, train_stream, validation_indices
from gwtn_dist.data.streams import read_index
from gwtn_dist.distributed.runtime import Runtime
from gwtn_dist.regime import gain_grid, plan_cells, regime_units
from gwtn_dist.stats import paired, pays
from gwtn_dist.workers import run_units
from tests.conftest import REPO
from tests.test_pipeline import fast_args


def test_paired_statistics_on_known_inputs():
    ref = {"0": 0.80, "1": 0.82, "2": 0.81}
    steady = paired({"0": 0.85, "1": 0.86, "2": 0.87}, ref)  # +0.05, +0.04, +0.06
    assert steady["per_seed"] == pytest.approx({"0": 0.05, "1": 0.04, "2": 0.06})
    assert steady["mean"] == pytest.approx(0.05) and steady["sd"] == pytest.approx(0.01)
    assert steady["wins"] == 3 and steady["seeds"] == 3
    assert pays(steady)
    assert pays(steady, arm_mean=0.86, kd_mean=0.85)
    assert not pays(steady, arm_mean=0.86, kd_mean=0.87)  # below logit KD's mean
    noisy = paired({"0": 0.85, "1": 0.84, "2": 0.80}, ref)  # +0.05, +0.02, -0.01
    assert noisy["mean"] == pytest.approx(0.02) and noisy["sd"] == pytest.approx(0.03)
    assert noisy["wins"] == 2 and not pays(noisy)
    wide_spread = paired({"0": 0.90, "1": 0.83, "2": 0.82}, ref)  # +0.10, +0.01, +0.01
    assert wide_spread["wins"] == 3 and not pays(wide_spread)  # mean 0.04 < 2 sd (0.104)
    assert paired({"7": 0.5}, ref)["seeds"] == 0 and not pays(paired({"7": 0.5}, ref))


def test_validation_split_is_stratified_seeded_and_never_trained_on(shard_dir):
    labels = read_index(shard_dir)["splits"]["train"]["labels"]
    val = validation_indices(shard_dir, 200, seed=0)
    assert len(val) == 200 and val == validation_indices(shard_dir, 200, seed=0)
    assert val != validation_indices(shard_dir, 200, seed=1)
    per_class, everywhere = Counter(labels[i] for i in val), Counter(labels)
    for c, n in everywhere.items():  # each class's share, to within one image
        assert abs(per_class[c] - n * 200 / len(labels)) <= 1
    # One epoch of the training stream is exactly the training images outside the split.
    stream = train_stream(shard_dir, batch_size=100, seed=0, shuffle_buffer=300, exclude=val)
    trained = torch.cat([next(stream)[0] for _ in range(10)]).flatten(1).sum(1).sort().values
    every = torch.cat([x for x, _ in eval_batches(shard_dir, 500, split="train")]).flatten(1)
    keep = torch.tensor([i not in val for i in range(len(labels))])
    assert torch.equal(trained, every[keep].sum(1).sort().values)
    # The validation batches are exactly the held-out images, in index order.
    held = torch.cat([x for x, _ in eval_batches(shard_dir, 64, split="train", only=val)])
    assert torch.equal(held.flatten(1), every[sorted(val)])
    # train_samples counts training images after the split is taken out.
    limited = train_stream(shard_dir, batch_size=100, seed=0, shuffle_buffer=300, limit=300,
                          exclude=val)
    assert sum(len(next(limited)[1]) for _ in range(3)) == 300
    assert limited.position == {"epoch": 0, "batch": 3, "skipped": {}}
    next(limited)
    assert limited.position == {"epoch": 1, "batch": 1, "skipped": {}}  # 300 images make one epoch


TUNE = ("compare.tune={scratch: {baseline.optim.lr: [0.1, 0.00001]}, "
        "win: {finetune.optim.lr: [0.00001, 0.05]}}")


def test_tuning_chooses_on_validation_and_never_reads_test(tmp_path, shard_dir, monkeypatch):
    reads: list[tuple[str, str]] = []  # (unit folder, split) of every evaluation
    unit = {"dir": "?"}
    real_train_unit, real_reader = compare_module.train_unit, tasks_module.rank_eval_batches

    def train_unit(rt, cfg, seed_dir, arm, teacher_dir):
        unit["dir"] = str(seed_dir)
        return real_train_unit(rt, cfg, seed_dir, arm, teacher_dir)

    def reader(cfg, limit, rank, world, split="test"):
        reads.append((unit["dir"], split))
        return real_reader(cfg, limit, rank, world, split)

    monkeypatch.setattr(compare_module, "train_unit", train_unit)
    monkeypatch.setattr(tasks_module, "rank_eval_batches", reader)
    run_dir = tmp_path / "cmp"
    assert main(["-q", "compare", *fast_args(
        run_dir, shard_dir, "arms=[scratch,win]", "compare.seeds=[0]",
        "compare.tune_seeds=[5]", "compare.share_teacher=true", "finetune.kd_steps=0",
        "data.val_samples=200", TUNE)]) == 0
    out = run_dir / "compare"
    tuning_reads = [split for folder, split in reads if "/tune/" in folder]
    assert tuning_reads and set(tuning_reads) == {"val"}
    assert {split for folder, split in reads if "/tune/" not in folder} == {"val", "test"}
    table = json.loads((out / "compare.json").read_text())
    for arm, stage in [("scratch", "scratch"), ("win", "finetune")]:
        rows = table["tuning"][arm]["points"]
        scores = [json.loads((out / "tune" / arm / f"p{i}" / "seed5" / stage / "stage.json")
                             .read_text()) for i in range(2)]
        assert all("test_accuracy" not in s for s in scores)  # the test split was never read
        assert [r["score"] for r in rows] == [s["val_accuracy"] for s in scores]
        best = max(range(2), key=lambda i: (scores[i]["val_accuracy"], -i))
        assert [r["chosen"] for r in rows] == [i == best for i in range(2)]
        assert table["tuning"][arm]["chosen"] == rows[best]["point"]
        # The reported seed trained with the chosen lr (the schedule's peak is the lr).
        (lr,) = rows[best]["point"].values()
        logged = [json.loads(line)["lr"]
                  for line in (out / "seed0" / stage / "metrics.jsonl").open()]
        assert max(logged) == pytest.approx(lr, rel=0.02)
    md = (out / "compare.md").read_text()
    assert md.index("Criterion") < md.index("| thin from scratch |")  # criterion first
    assert "Verdict, thin, Go Wide Then Narrow vs thin from scratch" in md


def test_two_workers_share_one_comparison(tmp_path, shard_dir):
    run_dir = tmp_path / "cmp"
    args = [sys.executable, "-m", "gwtn_dist", "compare", *fast_args(
        run_dir, shard_dir, "arms=[scratch,kd,win]", "compare.seeds=[0,1]",
        "compare.share_teacher=false", "threads=1", "eval_every=0")]
    first = subprocess.Popen(args, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
    # The second worker joins once the first has set up the folder.
    for _ in range(600):
        if (run_dir / "compare" / "config.yaml").is_file() or first.poll() is not None:
            break
        subprocess.run(["sleep", "0.1"], check=True)
    second = subprocess.run([*args, "resume=true"], cwd=REPO, capture_output=True, text=True,
                            timeout=600, check=False)
    _out, err = first.communicate(timeout=600)
    assert first.returncode == 0, err[-2000:]
    assert second.returncode == 0, second.stderr[-2000:]
    compare_dir = run_dir / "compare"
    table = json.loads((compare_dir / "compare.json").read_text())
    assert set(table["arms"]["win"]["per_seed"]) == {"0", "1"}
    # Every stage ran once: its metrics hold exactly its steps, and no lock is left behind.
    for stage_json in compare_dir.rglob("stage.json"):
        rec = json.loads(stage_json.read_text())
        lines = (stage_json.parent / "metrics.jsonl").read_text().splitlines()
        assert len(lines) == rec["steps"], stage_json
    assert not list(compare_dir.rglob(".lock-*"))
    # Both workers did some of the work (each logs the units it runs).
    assert "unit " in err and "unit " in second.stderr


def test_twice_the_budget_runs_every_arm_again_and_draws_both_budgets(tmp_path, shard_dir,
                                                                      monkeypatch):
    # Head start or lasting gain: every arm at 2× the method's budget, reported and drawn
    # beside ×1, so a gain that scratch catches up with shows in the table and the plot.
    from gwtn_dist import report

    drawn: dict = {}
    draw = report.plot_curves

    def spy(path, curves, table, **kwargs):
        drawn["curves"] = curves
        drawn["labels"] = draw(path, curves, table, **kwargs)
        return drawn["labels"]

    monkeypatch.setattr(report, "plot_curves", spy)
    run_dir = tmp_path / "cmp"
    assert main(["-q", "compare", *fast_args(run_dir, shard_dir, "arms=[scratch,win]",
                                             "compare.seeds=[0]",
                                             "compare.budget_mults=[1,2]")]) == 0
    out = run_dir / "compare"
    table = json.loads((out / "compare.json").read_text())
    budget = 3 * 12 + 22  # the method's thin-net steps at ×1 (fast_args)
    assert [b["budget_mult"] for b in table["budgets"]] == [1, 2]
    assert [b["budget_steps"] for b in table["budgets"]] == [budget, 2 * budget]
    doubled = json.loads((out / "x2" / "seed0" / "summary.json").read_text())["stages"]
    assert doubled["scratch"]["steps"] == 2 * budget
    assert doubled["imitate"]["steps"] == 3 * 24 and doubled["finetune"]["steps"] == 2 * 22
    assert "Head start or lasting gain" in (out / "compare.md").read_text()
    assert list(drawn["curves"]) == ["scratch", "win", "scratch@x2", "win@x2"]
    assert all(curve for per_seed in drawn["curves"].values() for curve in per_seed)
    assert drawn["labels"][:4] == ["thin from scratch", "thin, Go Wide Then Narrow",
                                   "thin from scratch (×2 budget)",
                                   "thin, Go Wide Then Narrow (×2 budget)"]


def test_the_teacher_cache_trains_a_teacher_once(tmp_path, shard_dir):
    cache = tmp_path / "teachers"
    for name in ("a", "b"):
        assert main(["-q", "wide", *fast_args(tmp_path / name, shard_dir,
                                               f"wide.cache={cache}")]) == 0
    (entry,) = [p for p in cache.iterdir() if p.is_dir()]
    a = json.loads((tmp_path / "a" / "wide" / "stage.json").read_text())
    b = json.loads((tmp_path / "b" / "wide" / "stage.json").read_text())
    assert "from_cache" not in a and b["from_cache"] == str(entry)
    assert (tmp_path / "a" / "wide" / "model.pt").read_bytes() == \
        (tmp_path / "b" / "wide" / "model.pt").read_bytes()
    assert json.loads((entry / "key.json").read_text())["wide"]["steps"] == 30
    # Another teacher setting is another entry, trained anew.
    assert main(["-q", "wide", *fast_args(tmp_path / "c", shard_dir, f"wide.cache={cache}",
                                           "wide.steps=31")]) == 0
    assert len([p for p in cache.iterdir() if p.is_dir()]) == 2


# Another worker: takes a lock with the workers' own FileLock, says so, and holds it until killed.
HOLD_LOCK = ("import sys, time; from gwtn_dist.workers import FileLock; "
             "assert FileLock(sys.argv[1]).acquire(); print('held', flush=True); time.sleep(600)")


def test_regime_runs_one_comparison_per_cell_and_draws_the_gain(tmp_path, shard_dir,
                                                               monkeypatch):
    """Two cells, each a whole comparison. When the worker starts taking units, the first
    cell's teacher is held by another (live) process: the worker must train the second cell's
    teacher meanwhile rather than wait, take over the first one's lock when its holder dies,
    and finish the grid."""
    run_dir = tmp_path / "reg"
    axes = ("regime.axes={depth: [{label: shallow, model.blocks: [1,1,1]}, "
            "{label: deep, model.blocks: [2,1,1]}]}")
    shared = {c: run_dir / "regime" / c / "compare" / "shared" for c in ("shallow", "deep")}
    holder = []  # the other worker: a process that takes the lock itself, then sleeps

    def held_by_another_worker_first(rt, units):  # the run folders exist by now
        holder.append(subprocess.Popen(
            [sys.executable, "-c", HOLD_LOCK, str(shared["shallow"] / ".lock-wide")],
            stdout=subprocess.PIPE, text=True))
        assert holder[0].stdout.readline().strip() == "held"
        run_units(rt, units)

    def release_when_the_other_teacher_is_done():  # or after 2 min, if it never starts
        deadline = time.monotonic() + 120
        while not (shared["deep"] / "wide" / "DONE").exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        for process in holder:
            process.kill()
            process.wait()

    monkeypatch.setattr(regime_module, "run_units", held_by_another_worker_first)
    watcher = threading.Thread(target=release_when_the_other_teacher_is_done)
    watcher.start()
    try:
        assert main(["-q", "regime", *fast_args(
            run_dir, shard_dir, "arms=[scratch,win]", "compare.seeds=[0]",
            "compare.share_teacher=true", "eval_every=0", "wide.steps=10",
            "imitate.steps_per_point=4", "finetune.kd_steps=0", "finetune.label_steps=6",
            axes)]) == 0
    finally:
        for process in holder:
            process.kill()
        watcher.join()
    done = {c: (shared[c] / "wide" / "DONE").stat().st_mtime for c in shared}
    assert done["deep"] < done["shallow"]
    out = run_dir / "regime"
    summary = json.loads((out / "regime.json").read_text())
    assert [c["labels"] for c in summary["cells"]] == [["shallow"], ["deep"]]
    for cell in summary["cells"]:
        table = json.loads((out / cell["cell"] / "compare" / "compare.json").read_text())
        assert cell["paired"]["win-scratch"] == table["budgets"][0]["paired"]["win-scratch"]
    assert "| shallow |" in (out / "regime.md").read_text()
    assert (out / "regime.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = yaml.safe_load((out / "deep" / "compare" / "config.yaml").read_text())
    assert saved["model"]["blocks"] == [2, 1, 1] and saved["regime"]["axes"] == {}


def test_regime_cells_with_one_teacher_train_it_once(tmp_path):
    """Cells that differ only after the teacher (here the fine-tuning lr) share its cache key:
    the later cell's teacher unit waits for the earlier one, to copy it, instead of training
    the same teacher at the same time in another worker. Without a cache nothing is shared."""
    axes = ("regime.axes={lr: [{label: a, finetune.optim.lr: 0.02}, "
            "{label: b, finetune.optim.lr: 0.05}, {label: c, model.blocks: [2,1,1]}]}")
    for cache, b_needs in ((tmp_path / "cache", ["a/teacher"]), (None, [])):
        extra = [f"wide.cache={cache}"] if cache else []
        cfg = load_config(REPO / "configs/tiny_cpu.yaml", [
            f"run_dir={tmp_path / f'reg{bool(cache)}'}", "arms=[scratch,win]", "compare.tune={}",
            "compare.share_teacher=true", "compare.seeds=[0]", axes, *extra])
        cells = plan_cells(Runtime(), cfg, tmp_path / f"reg{bool(cache)}")
        units = {u.name: u for u in regime_units(cells)}
        assert units["a/teacher"].needs == [] and units["c/teacher"].needs == []
        assert units["b/teacher"].needs == b_needs
        assert units["b/x1/seed0/win"].needs == ["b/teacher"]  # a cell's units need its own
        assert all(n in units for u in units.values() for n in u.needs)


def test_regime_with_an_absent_teacher_init_ends_in_the_config_line(tmp_path, shard_dir, capsys):
    """The regime plans every cell's teacher (its cache key hashes wide.init's weights) before
    any training: an absent wide.init is the one-line config error, exit 2, as in compare."""
    axes = "regime.axes={depth: [{label: a, model.blocks: [1,1,1]}]}"
    absent = tmp_path / "absent.pt"
    assert main(["-q", "regime", *fast_args(
        tmp_path / "reg", shard_dir, f"wide.init={absent}", f"wide.cache={tmp_path / 'cache'}",
        "compare.share_teacher=true", axes)]) == 2
    assert capsys.readouterr().err.strip() == f"gwtn: error: wide.init: {absent} not found"


def test_heat_map_marks_a_combination_without_a_gain_instead_of_showing_zero():
    """A grid with a cell missing (a 2×2 map drawn from three cells): the missing one is NaN
    and says so in words, since a blank cell on the red–blue scale would read as no gain."""
    def cell(depth, size, mean):
        pair = {"per_seed": {"0": mean}, "mean": mean, "sd": 0.001, "wins": int(mean > 0),
                "seeds": 1}
        return {"labels": [depth, size], "paired": {"win-scratch": pair}}

    summary = {"axes": ["depth", "data"], "metric": "test_accuracy",
               "cells": [cell("2,2,2", "5k", -0.0147), cell("2,2,2", "20k", 0.0021),
                         cell("8,8,8", "5k", -0.0181)]}
    rows, cols, gain, words = gain_grid(summary)
    assert rows == ["2,2,2", "8,8,8"] and cols == ["5k", "20k"]
    assert gain[0, 0] == -0.0147 and gain[0, 1] == 0.0021 and gain[1, 0] == -0.0181
    assert math.isnan(gain[1, 1]) and words[1, 1] == "not\nmeasured"
    assert words[0, 1] == "+0.0021\n± 0.0010\n1/1 ahead"
