"""A third family, added without an edit outside its own module (``tests/toy_family.py``: an
MLP with two imitation points), goes through ``gwtn run`` and ``gwtn compare`` like the built-in
ones: the run spec, the arms and the reports take everything family-specific from it."""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import pytest
import yaml

from gwtn_dist.cli import main
from gwtn_dist.config import ModelConfig
from gwtn_dist.models import family as family_module

RUN = {"seed": 0, "threads": 2, "progress": False, "eval_every": 10, "eval_samples": 100,
       "arms": ["win", "scratch"],
       "model": {"family": "mlp", "hidden": 12, "inner": 8},
       "data": {"batch_size": 32, "shuffle_buffer": 200, "train_samples": 0, "val_samples": 200},
       "wide": {"steps": 30, "optim": {"lr": 0.1}},
       "imitate": {"steps_per_point": 10, "optim": {"lr": 0.05, "weight_decay": 0.0}},
       "finetune": {"kd_steps": 0, "label_steps": 12, "optim": {"lr": 0.05}},
       "compare": {"seeds": [0, 1]}, "checkpoint": {"every": 10}}


@pytest.fixture
def mlp_config(tmp_path, shard_dir, monkeypatch) -> Path:
    """The toy family registered for this test only, and a config that selects it."""
    monkeypatch.setattr(family_module, "_families", dict(family_module._families))
    monkeypatch.setattr(ModelConfig, "_variants", dict(ModelConfig.variants()))
    importlib.reload(importlib.import_module("tests.toy_family"))  # registers model.family: mlp

    path = tmp_path / "mlp.yaml"
    path.write_text(yaml.safe_dump({**RUN, "data": {**RUN["data"], "shards": str(shard_dir)}}))
    return path


def test_a_third_family_runs_every_stage_and_its_baseline(tmp_path, mlp_config):
    run_dir = tmp_path / "run"
    assert main(["-q", "run", str(mlp_config), f"run_dir={run_dir}"]) == 0
    summary = json.loads((run_dir / "summary.json").read_text())["stages"]
    assert set(summary) == {"wide", "imitate", "finetune", "scratch"}
    imitation = summary["imitate"]
    assert imitation["points"] == ["block1", "block2"]
    assert set(imitation["relative_error"]) == {"block1", "block2"}
    # the budget: 2 points × 10 steps + 12 label steps, which scratch gets too
    assert summary["scratch"]["steps"] == 2 * 10 + 12 == summary["finetune"]["steps"] + 20
    assert summary["wide"]["params"] > summary["finetune"]["params"]  # the twin is wider
    assert "thin, Go Wide Then Narrow" in (run_dir / "results.md").read_text()


def test_a_third_family_goes_through_compare(tmp_path, mlp_config):
    run_dir = tmp_path / "cmp"
    assert main(["-q", "compare", str(mlp_config), f"run_dir={run_dir}",
                 "arms=[scratch,win,deeper]"]) == 0
    table = json.loads((run_dir / "compare" / "compare.json").read_text())
    assert set(table["arms"]) == {"scratch", "win", "deeper"}
    assert table["title"].startswith("fashion-mnist: thin 2 blocks")
    budget = table["budgets"][0]
    assert set(budget["verdicts"]) == {"win-scratch", "deeper-scratch", "win-deeper"}
    deeper = json.loads((run_dir / "compare" / "seed0" / "deeper" / "stage.json").read_text())
    assert deeper["blocks"] == 3 and deeper["steps"] == table["budget_steps"] == 32
    assert set(budget["after_imitation"]["0"]["relative_error"]) == {"block1", "block2"}
