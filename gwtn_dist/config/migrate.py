"""Configs in the forms older versions wrote, brought to today's: a run folder's saved
``config.yaml`` (``upgrade_saved_tree``), and the flat ``model`` section that teacher-cache
keys of older teachers were taken of (``flat_model_section``)."""

from __future__ import annotations

import dataclasses

from .schema import DEFAULT_FAMILY, ModelConfig

# ``compare.arms``'s default before the one ``arms`` list replaced it (a fact of old configs:
# it stays as it was whatever arms are added since).
OLD_COMPARE_ARMS = ("scratch", "kd", "win", "deeper")


def flat_model_section(m: ModelConfig) -> dict:
    """``m`` as a dict with every other family's keys at their defaults: the one flat
    ``model`` section of configs before each family had its own. Teacher-cache keys hash this
    form, so that teachers cached before stay found."""
    flat: dict = {}
    widen: dict = {}  # the one widen section of then: every family's multipliers
    for cls in ModelConfig.variants().values():
        flat.update(dataclasses.asdict(cls()))
        widen.update(flat["widen"])
    own = dataclasses.asdict(m)
    return {**flat, **own, "widen": {**widen, **own["widen"]}}


def upgrade_saved_tree(tree: dict) -> dict:
    """A saved config's tree (``config.yaml`` of a run) in today's form: a ``model`` section
    written before each family had its own (every family's keys, flat, ``widen`` included)
    keeps only the keys of its ``model.family``, which are all that ever decided what the run
    computed. The two arm lists of old configs (``baselines`` for ``gwtn run``, ``compare.arms``)
    become the one ``arms``: the compared arms, then any other baseline that was trained."""
    if "baselines" in tree or "arms" in (tree.get("compare") or {}):
        compare = dict(tree.get("compare") or {})
        arms = list(compare.pop("arms", OLD_COMPARE_ARMS))
        arms += [a for a in tree.get("baselines") or [] if a not in arms]
        tree = {**{k: v for k, v in tree.items() if k != "baselines"}, "arms": arms,
                "compare": compare}
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
