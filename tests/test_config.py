"""Config loading: YAML + dotted overrides, typed values, and errors that name the key."""

from __future__ import annotations

import dataclasses
import re
import time

import pytest
import yaml

from gwtn_dist.cli import main
from gwtn_dist.config import (
    Config,
    ConfigError,
    dump_config,
    fill_run_dir,
    load_config,
    to_dict,
)
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
    cfg = load_config(REPO / "configs/tiny_cpu.yaml",
                      ["wide.optim.lr=1e-3", "imitate.optim.lr=5E-4"])
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
    (["arms=[scratch,magic]"], ["arms", "magic"]),
    (["arms=[win,scratch,win]"], ["arms", "each arm once"]),
    (["baselines=[scratch]"], ["baselines", "replaced", "arms"]),
    (["compare.arms=[scratch,win]"], ["compare.arms", "replaced", "arms"]),
    (["finetune.distill.alpha=2"], ["finetune.distill.alpha", "[0, 1]"]),
    (["wide.optim.milestones=[0.8,0.2]"], ["wide.optim.milestones", "ascending"]),
    (["progress=maybe"], ["progress", "true or false"]),
    (["no_equals_sign"], ["key.sub=value"]),
    (["wide.steps.x=1"], ["wide.steps", "not a section"]),
    (["arms=[scratch,win]", "compare.tune={scratch: {baseline.optim.lr: [0.1]}}"],
     ["compare.tune", "'win'", "same tuning effort"]),
    (["arms=[scratch,win]", ("compare.tune={scratch: {baseline.optim.lr: [0.1]}, "
      "win: {finetune.optim.lr: [0.01, 0.02]}}")], ["compare.tune", "'scratch': 1", "'win': 2"]),
    (["arms=[scratch]", "compare.tune={scratch: {wide.optim.lr: [0.1]}}"],
     ["compare.tune.scratch", "wide.optim.lr", "baseline.optim."]),
    (["arms=[win]", "compare.tune={win: {finetune.label_steps: [10, 20]}}"],
     ["finetune.label_steps", "budget"]),
    (["arms=[scratch]", "compare.tune={scratch: {baseline.optim.lr: [0.1]}}",
      "compare.tune_seeds=[1]", "compare.seeds=[0,1]"], ["compare.tune_seeds", "never reported"]),
    (["arms=[scratch]", "compare.tune={scratch: {baseline.optim.lr: [0.1]}}",
      "data.val_samples=0"], ["data.val_samples", "validation"]),
    (["compare.budget_mults=[0]"], ["compare.budget_mults"]),
    (["wide.optim.lr=.nan"], ["wide.optim.lr", "finite"]),
    (["wide.optim.lr=.inf"], ["wide.optim.lr", "finite"]),
    (["wide.optim.grad_clip=.nan"], ["wide.optim.grad_clip", "finite"]),
    (["model.blocks=[1,2"], ["model.blocks=[1,2", "not valid YAML"]),
    (["run_dir=runs/{name}"], ["run_dir", "{date} and {seed}"]),
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


def test_gwtn_config_prints_the_resolved_config_with_help(tmp_path, capsys):
    overrides = ["wide.steps=7", "model.blocks=[2,2,2]"]
    assert main(["config", str(REPO / "configs/tiny_cpu.yaml"), *overrides]) == 0
    text = capsys.readouterr().out
    cfg = load_config(REPO / "configs/tiny_cpu.yaml", overrides)
    assert yaml.safe_load(text) == to_dict(cfg)  # every key, defaults included
    (tmp_path / "resolved.yaml").write_text(text)
    assert load_config(tmp_path / "resolved.yaml") == cfg
    lines = text.splitlines()
    assert "wide:  # Stage 1: train the wide twin" in text
    assert any(line.startswith("  steps_per_point: 15  # steps of each phase") for line in lines)
    assert "  blocks: [2, 2, 2]" in lines and "  dataset: fashion-mnist  # `fashion-mnist`" in text
    assert main(["config", str(REPO / "configs/tiny_cpu.yaml"), "wide.nope=1"]) == 2
    assert "unknown key wide.nope" in capsys.readouterr().err


def test_run_dir_placeholders_are_filled_for_a_new_run_only():
    cfg = load_config(REPO / "configs/tiny_cpu.yaml", ["run_dir=runs/x-{date}-s{seed}", "seed=3"])
    assert cfg.run_dir == "runs/x-{date}-s{seed}"  # loading leaves them; starting a run fills
    assert fill_run_dir(cfg, "20250102-030405").run_dir == "runs/x-20250102-030405-s3"
    for resumed, continuing in ((True, False), (False, True)):
        with pytest.raises(ConfigError, match=r"run_dir: .*\{date\}.*give its folder"):
            fill_run_dir(dataclasses.replace(cfg, resume=resumed), "d", continuing=continuing)
    seed_only = dataclasses.replace(cfg, run_dir="runs/s{seed}", resume=True)
    assert fill_run_dir(seed_only, "d", continuing=True).run_dir == "runs/s3"


def test_each_run_with_date_gets_its_own_folder(tmp_path, shard_dir, capsys):
    from tests.test_pipeline import fast_args

    args = fast_args(tmp_path / "r-{date}", shard_dir, "wide.steps=2", "eval_test=false")
    for _ in range(2):
        assert main(["-q", "wide", *args]) == 0
        time.sleep(1.1)  # {date} counts seconds
    folders = sorted(tmp_path.glob("r-*"))
    assert len(folders) == 2 and all(re.fullmatch(r"r-\d{8}-\d{6}", f.name) for f in folders)
    for folder in folders:
        assert yaml.safe_load((folder / "config.yaml").read_text())["run_dir"] == str(folder)
        assert (folder / "wide" / "DONE").is_file()
    capsys.readouterr()
    assert main(["-q", "wide", *args, "resume=true"]) == 2
    assert "give its folder" in capsys.readouterr().err


def test_a_folder_saved_with_the_two_old_arm_lists_resumes_under_the_one_arms_list(tmp_path):
    from gwtn_dist.distributed.runtime import Runtime
    from gwtn_dist.pipeline import prepare_run_dir, release_locks

    run_dir = tmp_path / "run"
    path = REPO / "configs/tiny_cpu.yaml"
    cfg = load_config(path, [f"run_dir={run_dir}", "arms=[scratch,kd,win]"])
    prepare_run_dir(Runtime(), cfg, run_dir)
    release_locks()
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    # As saved before `arms`: gwtn run's `baselines` and gwtn compare's `compare.arms`.
    old = {**{k: v for k, v in saved.items() if k != "arms"}, "baselines": ["scratch"],
           "compare": {**saved["compare"], "arms": ["scratch", "kd", "win"]}}
    (run_dir / "config.yaml").write_text(yaml.safe_dump(old))
    prepare_run_dir(Runtime(), load_config(path, [f"run_dir={run_dir}", "resume=true",
                                                  "arms=[scratch,kd,win]"]), run_dir)
    release_locks()
    (run_dir / "config.yaml").write_text(yaml.safe_dump(old))
    with pytest.raises(ConfigError, match="arms"):
        prepare_run_dir(Runtime(), load_config(path, [f"run_dir={run_dir}", "resume=true",
                                                      "arms=[scratch,win]"]), run_dir)
    release_locks()


@pytest.mark.parametrize("config, override, words", [
    ("tiny_cpu", ["data.mlm_probability=0.2"],
     ["data.mlm_probability", "not a key of a fashion-mnist dataset", "text key"]),
    ("tiny_cpu", ["data.num_workers=2"],
     ["data.num_workers", "fashion-mnist dataset", "imagefolder and text"]),
    ("bert_tiny_cpu", ["data.val_samples=100"],
     ["data.val_samples", "not a key of a text dataset", "fashion-mnist key"]),
    ("bert_tiny_cpu", ["data.image_size=32"], ["data.image_size", "imagefolder key"]),
    ("imagenet_resnet50", ["data.hflip=false"],
     ["data.hflip", "not a key of a imagefolder dataset", "fashion-mnist key"]),
    ("bert_tiny_cpu", ["data.mlm_probability=1"], ["data.mlm_probability", "(0, 1)"]),
    ("imagenet_resnet50", ["data.image_size=0"], ["data.image_size", "> 0"]),
    ("bert_tiny_cpu", ["data.nonsense=1"], ["unknown key data.nonsense", "mlm_probability"]),
])
def test_a_key_of_another_dataset_names_the_key_and_its_dataset(config, override, words):
    with pytest.raises(ConfigError) as info:
        load_config(REPO / "configs" / f"{config}.yaml", override)
    for word in words:
        assert word in str(info.value)


# The data section as every run folder saved it before each dataset had its own: every
# dataset's keys, at their defaults where the config did not set them.
UNION_DATA = {"dataset": "fashion-mnist", "shards": "runs/data/fashion-mnist", "batch_size": 128,
              "eval_batch_size": 500, "shuffle_buffer": 5000, "train_samples": 0,
              "val_samples": 5000, "val_seed": 0, "crop_padding": 2, "hflip": True,
              "mean": 0.286, "std": 0.353, "num_workers": 0, "prefetch": 2, "image_size": 224,
              "eval_resize": 256, "mlm_probability": 0.15, "eval_missing_ok": 0.0}


@pytest.mark.parametrize("config", ["tiny_cpu", "bert_tiny_cpu", "imagenet_resnet50"])
def test_a_folder_saved_with_every_datasets_data_keys_resumes(tmp_path, config):
    from gwtn_dist.distributed.runtime import Runtime
    from gwtn_dist.pipeline import prepare_run_dir, release_locks

    run_dir, path = tmp_path / "run", REPO / "configs" / f"{config}.yaml"
    prepare_run_dir(Runtime(), load_config(path, [f"run_dir={run_dir}"]), run_dir)
    release_locks()
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    old = {**saved, "data": {**UNION_DATA, **saved["data"]}}  # as saved before
    assert set(old["data"]) == set(UNION_DATA)
    resumed = load_config(path, [f"run_dir={run_dir}", "resume=true"])
    for data, refused in ((old["data"], None), ({**old["data"], "image_size": 96}, "image_size"),
                          ({**old["data"], "val_samples": 100}, "val_samples")):
        if refused in dataclasses.asdict(resumed.data):
            continue  # a key of this dataset: an ordinary change, tested elsewhere
        (run_dir / "config.yaml").write_text(yaml.safe_dump({**old, "data": data}))
        if refused is None:
            prepare_run_dir(Runtime(), resumed, run_dir)  # resumes, no key reported changed
            assert set(yaml.safe_load((run_dir / "config.yaml").read_text())["data"]) == \
                set(dataclasses.asdict(resumed.data))  # rewritten in the dataset's own form
        else:  # a key of another dataset, off its default: the run was started with it
            with pytest.raises(ConfigError, match=rf"differs .*data\.{refused} "):
                prepare_run_dir(Runtime(), resumed, run_dir)
        release_locks()
