"""Config loading: YAML + dotted overrides, typed values, and errors that name the key."""

from __future__ import annotations

import pytest
import yaml

from gwtn_dist.config import Config, ConfigError, dump_config, load_config
from tests.conftest import REPO

CONFIGS = sorted((REPO / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_load(path):
    cfg = load_config(path)
    assert isinstance(cfg, Config)


def test_overrides_keep_their_types():
    cfg = load_config(REPO / "configs/tiny_cpu.yaml", [
        "run_dir=runs/x", "imitate.steps_per_point=200", "imitate.lower_lr_mult=1",
        "model.blocks=[2,3,4]", "progress=false", "imitate.target_norm=layernorm",
    ])
    assert cfg.run_dir == "runs/x"
    assert cfg.imitate.steps_per_point == 200
    assert cfg.imitate.lower_lr_mult == 1.0 and isinstance(cfg.imitate.lower_lr_mult, float)
    assert cfg.model.blocks == [2, 3, 4]
    assert cfg.progress is False
    assert cfg.imitate.target_norm == "layernorm"


def test_exponent_numbers_are_numbers():
    # PyYAML reads "1e-3" (no dot) as a string; a user writing it means the number.
    cfg = load_config(REPO / "configs/tiny_cpu.yaml", ["wide.optim.lr=1e-3", "imitate.optim.lr=5E-4"])
    assert cfg.wide.optim.lr == 1e-3 and cfg.imitate.optim.lr == 5e-4


def test_file_values_survive_where_not_overridden():
    cfg = load_config(REPO / "configs/tiny_cpu.yaml", ["wide.steps=7"])
    raw = yaml.safe_load((REPO / "configs/tiny_cpu.yaml").read_text())
    assert cfg.wide.steps == 7
    assert cfg.imitate.steps_per_point == raw["imitate"]["steps_per_point"]
    assert cfg.wide.optim.lr == raw["wide"]["optim"]["lr"]


@pytest.mark.parametrize("override, words", [
    (["imitate.step_per_point=3"], ["imitate.step_per_point", "steps_per_point"]),
    (["nonsense=1"], ["nonsense", "run_dir"]),
    (["imitate.target_norm=batchnorm"], ["imitate.target_norm", "'layernorm'"]),
    (["wide.steps=ten"], ["wide.steps", "integer"]),
    (["wide.optim.lr=fast"], ["wide.optim.lr", "number"]),
    (["wide.steps=0"], ["wide.steps", "> 0"]),
    (["model.inner_widths=[8,16]"], ["model.inner_widths", "one width per stage"]),
    (["model.widen.boundary_mult=2", "model.imitation_points=blocks"],
     ["model.imitation_points", "boundary_mult"]),
    (["compare.arms=[scratch,magic]"], ["compare.arms", "magic"]),
    (["finetune.distill.alpha=2"], ["finetune.distill.alpha", "[0, 1]"]),
    (["wide.optim.milestones=[0.8,0.2]"], ["wide.optim.milestones", "ascending"]),
    (["progress=maybe"], ["progress", "true or false"]),
    (["no_equals_sign"], ["key.sub=value"]),
    (["wide.steps.x=1"], ["wide.steps", "not a section"]),
    (["compare.arms=[scratch,win]", "compare.tune={scratch: {baseline.optim.lr: [0.1]}}"],
     ["compare.tune", "'win'", "same tuning effort"]),
    (["compare.arms=[scratch,win]", ("compare.tune={scratch: {baseline.optim.lr: [0.1]}, "
      "win: {finetune.optim.lr: [0.01, 0.02]}}")], ["compare.tune", "'scratch': 1", "'win': 2"]),
    (["compare.arms=[scratch]", "compare.tune={scratch: {wide.optim.lr: [0.1]}}"],
     ["compare.tune.scratch", "wide.optim.lr", "baseline.optim."]),
    (["compare.arms=[win]", "compare.tune={win: {finetune.label_steps: [10, 20]}}"],
     ["finetune.label_steps", "budget"]),
    (["compare.arms=[scratch]", "compare.tune={scratch: {baseline.optim.lr: [0.1]}}",
      "compare.tune_seeds=[1]", "compare.seeds=[0,1]"], ["compare.tune_seeds", "never reported"]),
    (["compare.arms=[scratch]", "compare.tune={scratch: {baseline.optim.lr: [0.1]}}",
      "data.val_samples=0"], ["data.val_samples", "validation"]),
    (["compare.budget_mults=[0]"], ["compare.budget_mults"]),
    (["wide.optim.lr=.nan"], ["wide.optim.lr", "finite"]),
    (["wide.optim.lr=.inf"], ["wide.optim.lr", "finite"]),
    (["wide.optim.grad_clip=.nan"], ["wide.optim.grad_clip", "finite"]),
    (["model.blocks=[1,2"], ["model.blocks=[1,2", "not valid YAML"]),
    (["wide.init=t.pt", "model.family=bert", "data.dataset=text"], ["wide.init", "ResNet"]),
])
def test_bad_input_names_the_key(override, words):
    with pytest.raises(ConfigError) as info:
        load_config(REPO / "configs/tiny_cpu.yaml", override)
    for word in words:
        assert word in str(info.value)


def test_malformed_yaml_file_is_a_config_error(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("wide:\n  steps: [1, 2\n")
    with pytest.raises(ConfigError, match="bad.yaml: not valid YAML"):
        load_config(bad)


def test_missing_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")


def test_dumped_config_loads_back_identically(tmp_path):
    cfg = load_config(REPO / "configs/fmnist_resnet.yaml", ["seed=5", "model.blocks=[2,2,2]"])
    dump_config(cfg, tmp_path / "c.yaml")
    assert load_config(tmp_path / "c.yaml") == cfg


def test_quiet_goes_anywhere_before_a_double_dash():
    from gwtn_dist.cli import _quiet_first, build_parser

    for argv in (["run", "c.yaml", "-q", "x=1"], ["-q", "run", "c.yaml", "x=1"],
                 ["run", "c.yaml", "x=1", "--quiet"]):
        args = build_parser().parse_args(_quiet_first(argv))
        assert args.quiet and args.config == "c.yaml" and args.overrides == ["x=1"]
    assert not build_parser().parse_args(_quiet_first(["run", "c.yaml"])).quiet
    # After `--`, -q belongs to the command gwtn launch starts.
    assert _quiet_first(["launch", "--", "run", "c.yaml", "-q"]) == [
        "launch", "--", "run", "c.yaml", "-q"]
