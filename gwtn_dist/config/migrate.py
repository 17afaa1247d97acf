"""Configs in the forms older versions wrote, brought to today's: a run folder's saved
``config.yaml`` (``upgrade_saved_tree``), and the flat ``model`` and ``data`` sections that
teacher-cache keys of older teachers were taken of (``flat_model_section``,
``flat_data_section``)."""

from __future__ import annotations

import copy
import dataclasses

from .schema import DEFAULT_DATASET, DEFAULT_FAMILY, DataConfig, ModelConfig

# ``compare.arms``'s default before the one ``arms`` list replaced it (a fact of old configs:
# it stays as it was whatever arms are added since).
OLD_COMPARE_ARMS = ("scratch", "kd", "win", "deeper")


# The one flat ``model`` section of configs before each family had its own: every key of the
# two families of then (ResNet's and BERT's), at its default then. Frozen, not derived from
# today's classes, so that adding a family or a field to one family leaves the flat form of
# the others as it was (``family`` and ``compile``: every section has its own).
FLAT_MODEL_SECTION = {
    "family": "bert", "compile": False, "geometry": "small", "in_channels": 1,
    "num_classes": 10, "stem_width": 16, "blocks": [4, 4, 4], "inner_widths": [8, 16, 32],
    "expansion": 4,
    "widen": {"boundary_mult": 1, "inner_mult": 4, "attention_mult": 4, "ffn_mult": 4},
    "imitation_points": "stages", "hidden": 768, "layers": 12, "heads": 12, "head_dim": 64,
    "ffn": 3072, "vocab_size": 30522, "max_len": 512, "dropout": 0.1,
}


def flat_model_section(m: ModelConfig) -> dict:
    """``m`` in the one flat ``model`` section of configs before each family had its own: its
    own keys over ``FLAT_MODEL_SECTION`` (the other keys of then, at their defaults then).
    Teacher-cache keys hash this form, so that teachers cached before stay found."""
    flat = copy.deepcopy(FLAT_MODEL_SECTION)
    own = dataclasses.asdict(m)
    return {**flat, **own, "widen": {**flat["widen"], **own["widen"]}}


# The one flat ``data`` section of configs before each dataset had its own: every key of the
# three datasets of then (Fashion-MNIST's, image folders', token shards'), at its default then.
# Frozen like FLAT_MODEL_SECTION: a key added to one dataset leaves the others' keys as they were.
FLAT_DATA_SECTION = {
    "dataset": "fashion-mnist", "shards": "runs/data/fashion-mnist", "batch_size": 128,
    "eval_batch_size": 500, "shuffle_buffer": 5000, "train_samples": 0, "val_samples": 5000,
    "val_seed": 0, "crop_padding": 2, "hflip": True, "mean": 0.2860, "std": 0.3530,
    "num_workers": 0, "prefetch": 2, "image_size": 224, "eval_resize": 256,
    "mlm_probability": 0.15, "eval_missing_ok": 0.0,
}


def flat_data_section(d: DataConfig) -> dict:
    """``d`` in the one flat ``data`` section of configs before each dataset had its own: its
    own keys over ``FLAT_DATA_SECTION`` (the other keys of then, at their defaults then).
    Teacher-cache keys hash this form, so that teachers cached before stay found."""
    return {**FLAT_DATA_SECTION, **dataclasses.asdict(d)}


def _upgrade_data(data: dict) -> dict:
    """A saved ``data`` section of before each dataset had its own (every dataset's keys) with
    only its dataset's keys, and any other that holds a value off its default then: it never
    decided what the run computed, yet the run was started with it, so a resume is refused
    naming it (as is a config that sets it now)."""
    variants = DataConfig.variants()
    if data.get("dataset", DEFAULT_DATASET) not in variants:
        return data
    own = {f.name for f in dataclasses.fields(variants[data.get("dataset", DEFAULT_DATASET)])}
    return {k: v for k, v in data.items()
            if k in own or k not in FLAT_DATA_SECTION or v != FLAT_DATA_SECTION[k]}


def upgrade_saved_tree(tree: dict) -> dict:
    """A saved config's tree (``config.yaml`` of a run) in today's form: a ``model`` section
    written before each family had its own (every family's keys, flat, ``widen`` included)
    keeps only the keys of its ``model.family``, which are all that ever decided what the run
    computed; so does a flat ``data`` section of its ``data.dataset`` (``_upgrade_data``).
    The two arm lists of old configs (``baselines`` for ``gwtn run``, ``compare.arms``)
    become the one ``arms``: the compared arms, then any other baseline that was trained."""
    if "baselines" in tree or "arms" in (tree.get("compare") or {}):
        compare = dict(tree.get("compare") or {})
        arms = list(compare.pop("arms", OLD_COMPARE_ARMS))
        arms += [a for a in tree.get("baselines") or [] if a not in arms]
        tree = {**{k: v for k, v in tree.items() if k != "baselines"}, "arms": arms,
                "compare": compare}
    if isinstance(tree.get("data"), dict):
        tree = {**tree, "data": _upgrade_data(tree["data"])}
    model = tree.get("model")
    variants = ModelConfig.variants()
    if not isinstance(model, dict) or model.get("family", DEFAULT_FAMILY) not in variants:
        return tree
    cls = variants[model.get("family", DEFAULT_FAMILY)]
    own = {f.name for f in dataclasses.fields(cls)}
    model = {k: v for k, v in model.items() if k in own}
    if isinstance(model.get("widen"), dict):  # then shared: it held every family's multipliers
        own_widen = {f.name for f in dataclasses.fields(cls().widen)}
        model["widen"] = {k: v for k, v in model["widen"].items() if k in own_widen}
    return {**tree, "model": model}
