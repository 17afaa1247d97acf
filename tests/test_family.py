"""Model families: the registry, each family's own ``model`` section, and no family branches
outside the family packages."""

from __future__ import annotations

import re

import pytest
import yaml

from gwtn_dist.config import ConfigError, dump_config, load_config, to_dict
from gwtn_dist.models.bert.config import BertModelConfig
from gwtn_dist.models.family import family_for, known_families, register_family
from gwtn_dist.models.resnet.config import ResNetModelConfig
from tests.conftest import REPO

PACKAGE = REPO / "gwtn_dist"
FAMILY_PACKAGES = (PACKAGE / "models" / "resnet", PACKAGE / "models" / "bert")
# A branch on which family a config, net or task is: compare a family name, or test a
# family's own class.
BRANCH = re.compile(r"family\s*[!=]=|isinstance\([^)]*\b(Bert|ResNet|ImageTask|TextTask)\w*")
BERT = REPO / "configs/bert_tiny_cpu.yaml"
RESNET = REPO / "configs/tiny_cpu.yaml"


def test_no_family_branch_outside_the_family_packages():
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if any(folder in path.parents for folder in FAMILY_PACKAGES):
            continue
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if BRANCH.search(line):
                found.append(f"{path.relative_to(REPO)}:{n}: {line.strip()}")
    assert not found, "family branches belong in the family's Family:\n" + "\n".join(found)


# A family looked up again below the command (the run spec carries it).
LOOKUP = re.compile(r"\b(family_for|task_for)\(|models\.family import .*\b(build_thin|build_wide|"
                    r"shape_meta|imitation_points|point_index)\b")
# An arm named in code: the arms registry (gwtn_dist/arms.py) holds every arm's definition.
ARM_NAME = re.compile(r"""(==|!=|\bin)\s*["'](win|kd)["']|["'](win|kd)["']\s*(==|!=|\bin)""")


def test_the_stages_and_commands_take_the_family_and_arms_from_the_run_spec():
    files = [*sorted((PACKAGE / "stages").glob("*.py")),
             *(PACKAGE / name for name in ("pipeline.py", "compare.py", "report.py"))]
    found = [f"{path.relative_to(REPO)}:{n}: {line.strip()}" for path in files
             for n, line in enumerate(path.read_text().splitlines(), 1)
             if LOOKUP.search(line) or ARM_NAME.search(line)]
    assert not found, "resolve once (spec.resolve) and use the arms registry:\n" + "\n".join(
        found)


def test_the_registry_finds_families_by_name_config_net_and_shape():
    assert {"resnet", "bert"} <= set(known_families())
    cfg = load_config(BERT)
    family = family_for(cfg)
    assert family is family_for("bert") is family_for(cfg.model)
    shape = family.shape(cfg.model, wide=False)
    assert family_for(shape) is family and family_for(family.build(shape)) is family
    assert family_for(load_config(None)).name == "resnet"


def test_an_unknown_family_names_model_family_and_the_known_ones():
    with pytest.raises(ConfigError) as info:
        family_for("gpt")
    assert all(w in str(info.value) for w in ("model.family", "'gpt'", "bert", "resnet"))
    with pytest.raises(ConfigError, match=r"model.family: 'gpt' is not allowed.*'resnet'"):
        load_config(None, ["model.family=gpt"])


def test_a_registered_family_is_found(monkeypatch):
    from gwtn_dist.config import ModelConfig
    from gwtn_dist.models import family as family_module

    monkeypatch.setattr(family_module, "_families", dict(family_module._families))
    monkeypatch.setattr(ModelConfig, "_variants", dict(ModelConfig.variants()))
    resnet = family_for("resnet")
    register_family("resnet2", resnet)
    assert family_for("resnet2") is resnet and "resnet2" in known_families()
    # … and the config loader knows its model section
    assert ModelConfig.variants()["resnet2"] is resnet.config_class


@pytest.mark.parametrize("path, override, words", [
    (RESNET, ["model.layers=3"], ["model.layers", "not a key of a resnet model", "bert"]),
    (BERT, ["model.blocks=[1,1,1]"], ["model.blocks", "not a key of a bert model", "resnet"]),
    (BERT, ["model.geometry=small"], ["model.geometry", "bert model"]),
    (BERT, ["model.heads=0"], ["model.heads"]),
    (BERT, ["compare.deeper_layers=-1"], ["compare.deeper_layers"]),
    (RESNET, ["compare.deeper_blocks=[1,1]"], ["compare.deeper_blocks", "per stage"]),
    (RESNET, ["model.family=bert"], ["model.blocks", "not a key of a bert model"]),
    (RESNET, ["model.nonsense=1"], ["unknown key model.nonsense", "allowed here"]),
])
def test_a_key_of_another_family_or_a_bad_value_names_the_key(path, override, words):
    with pytest.raises(ConfigError) as info:
        load_config(path, override)
    for word in words:
        assert word in str(info.value)


def test_each_family_checks_only_its_own_keys():
    # compare.deeper_blocks is the ResNet baseline's depth: a BERT run does not check it.
    cfg = load_config(BERT, ["compare.deeper_blocks=[1]"])
    assert isinstance(cfg.model, BertModelConfig) and "blocks" not in to_dict(cfg)["model"]
    resnet = load_config(RESNET)
    assert isinstance(resnet.model, ResNetModelConfig) and "layers" not in to_dict(resnet)["model"]


@pytest.mark.parametrize("path", [BERT, RESNET], ids=["bert", "resnet"])
def test_saved_configs_round_trip(tmp_path, path):
    cfg = load_config(path, ["seed=3"])
    dump_config(cfg, tmp_path / "c.yaml")
    assert load_config(tmp_path / "c.yaml") == cfg


def _old_flat(model: dict) -> dict:
    """A ``model`` section as runs saved it before each family had its own: every key."""
    flat = {**to_dict(load_config(None))["model"], **to_dict(load_config(BERT))["model"]}
    return {k: model.get(k, v) for k, v in flat.items()}


@pytest.mark.parametrize("path", [BERT, RESNET], ids=["bert", "resnet"])
def test_a_run_resumes_from_its_saved_config_in_either_form(tmp_path, path):
    from gwtn_dist.distributed.runtime import Runtime
    from gwtn_dist.pipeline import prepare_run_dir, release_locks

    run_dir = tmp_path / "run"
    cfg = load_config(path, [f"run_dir={run_dir}"])
    prepare_run_dir(Runtime(), cfg, run_dir)
    release_locks()
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    other = {"bert": "blocks", "resnet": "layers"}[cfg.model.family]
    assert other not in saved["model"]  # today's form: the family's keys only
    resumed = load_config(path, [f"run_dir={run_dir}", "resume=true"])
    prepare_run_dir(Runtime(), resumed, run_dir)  # compares equal to a fresh load
    release_locks()
    old = {**saved, "model": _old_flat(saved["model"])}
    assert other in old["model"]
    (run_dir / "config.yaml").write_text(yaml.safe_dump(old))
    # a run saved with the old flat section resumes too
    prepare_run_dir(Runtime(), resumed, run_dir)
    release_locks()
    (run_dir / "config.yaml").write_text(yaml.safe_dump(old))
    key, value = {"bert": ("model.layers", 3), "resnet": ("model.blocks", [2, 1, 1])}[
        cfg.model.family]
    changed = load_config(path, [f"run_dir={run_dir}", "resume=true", f"{key}={value}"])
    with pytest.raises(ConfigError, match=re.escape(key)):
        prepare_run_dir(Runtime(), changed, run_dir)
    release_locks()


@pytest.mark.parametrize("path", [BERT, RESNET], ids=["bert", "resnet"])
def test_teacher_cache_keys_hash_the_flat_model_section(path):
    """Teachers cached before each family had its own section keep their keys: the key's
    model section still holds every family's keys, the other families' at their defaults."""
    from gwtn_dist.stages.teacher_cache import teacher_settings

    cfg = load_config(path)
    model = teacher_settings(cfg)["model"]
    expected = {**to_dict(load_config(None))["model"], "hidden": 768, "layers": 12,
                "heads": 12, "head_dim": 64, "ffn": 3072, "vocab_size": 30522,
                "max_len": 512, "dropout": 0.1, **to_dict(cfg)["model"],
                # the one widen section of then: every family's multipliers
                "widen": {"inner_mult": 4, "boundary_mult": 1, "attention_mult": 4,
                          "ffn_mult": 4, **to_dict(cfg)["model"]["widen"]}}
    expected.pop("compile")  # how the net runs, not what it is: keys from before it stay
    assert model == expected
    compiled = load_config(path, ["model.compile=true", "data.eval_missing_ok=0.1"])
    assert teacher_settings(compiled) == teacher_settings(cfg)


def test_the_default_configs_teacher_keeps_its_cache_key():
    """A teacher cached by an earlier version is found again: adding a config key that does
    not decide the teacher's weights must not change the key (this one was taken before
    model.compile and data.eval_missing_ok existed; each changed it once)."""
    from gwtn_dist.stages.teacher_cache import cache_dir

    cfg = load_config(REPO / "configs/fmnist_resnet.yaml")
    assert cache_dir(cfg).name == "e86d7ea4f77ede80"
    # A BERT's too, on shards that are not there (so no test split of theirs is keyed on).
    bert = load_config(BERT, ["wide.cache=cache", "data.shards=no/such/shards"])
    assert cache_dir(bert).name == "b8add9d5edfd248d"


@pytest.mark.parametrize("change", ["a field of the other family", "a new family"])
def test_a_teacher_key_does_not_see_other_families(monkeypatch, change):
    """A family's teacher-cache key is taken of its own model section: adding a family, or a
    field to another family's section, must not make every cached teacher train again."""
    import dataclasses

    from gwtn_dist.config import ModelConfig
    from gwtn_dist.stages.teacher_cache import cache_dir

    cfg = load_config(REPO / "configs/fmnist_resnet.yaml")
    before = cache_dir(cfg)
    monkeypatch.setattr(ModelConfig, "_variants", dict(ModelConfig.variants()))
    if change == "a new family":
        toy = dataclasses.make_dataclass("ToyModelConfig", [("width", int, 64)],
                                         bases=(ModelConfig,))
        ModelConfig.register("toy", toy)
    else:
        grown = dataclasses.make_dataclass("GrownBertConfig", [("rotary", bool, False)],
                                           bases=(BertModelConfig,))
        ModelConfig.register("bert", grown)
    assert cache_dir(cfg) == before


def test_a_new_key_version_takes_no_older_teacher(monkeypatch):
    """Raising KEY_VERSION (same settings, a different teacher) moves every key."""
    from gwtn_dist.stages import teacher_cache

    cfg = load_config(REPO / "configs/fmnist_resnet.yaml")
    first = teacher_cache.cache_dir(cfg)
    monkeypatch.setattr(teacher_cache, "KEY_VERSION", 2)
    assert teacher_cache.cache_dir(cfg) != first
    assert teacher_cache.teacher_settings(cfg)["key_version"] == 2


@pytest.mark.parametrize("path", [BERT, RESNET], ids=["bert", "resnet"])
def test_a_familys_synthetic_batch_is_what_its_thin_net_scores(path):
    import torch

    from gwtn_dist.models.family import build_thin

    cfg = load_config(path)
    family = family_for(cfg)
    x, y = family.synthetic_batch(cfg, 3, torch.Generator().manual_seed(0))
    outputs, targets = family.task(cfg).scored(build_thin(cfg.model), x, y)
    assert outputs.shape[0] == targets.shape[0] and torch.isfinite(outputs).all()
    again, _ = family.synthetic_batch(cfg, 3, torch.Generator().manual_seed(0))
    assert torch.equal(again["input_ids"] if isinstance(x, dict) else again,
                       x["input_ids"] if isinstance(x, dict) else x)  # seeded: replayable
