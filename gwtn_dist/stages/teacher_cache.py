"""A folder of finished wide teachers (``wide.cache``), so a teacher trained to convergence
is paid for once: later runs with the same teacher settings copy it instead of training.

The key is a hash of everything that decides the teacher's weights: the model section, the
data section (less how it is read: workers, eval batch), the wide section (less the cache
path; ``init``, the weights it starts from, by their content's hash), the seed, the memory
format and the precision; for token shards with a test split, also their split periods and rule (the
key is the shards' path, and a folder rewritten with a test split no longer trains on those
documents: a teacher cached before must not be reused). ``CACHE/<key>/`` holds the finished
stage's ``model.pt``, ``stage.json``, ``metrics.jsonl``, ``DONE`` and the ``key.json`` the
hash was taken of.

The model section is the run's own family's, and the data section the run's own dataset's,
each in the flat form of older configs over a frozen table (``config.migrate.flat_model_section``,
``flat_data_section``): adding a family or a dataset, or a field to another one, changes no
key. ``KEY_VERSION`` says what the settings mean: raise it when a change of code
makes the same settings train a different teacher, so that no older teacher is taken for it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path

from ..config import Config, flat_data_section, flat_model_section, to_dict
from ..data.datasets import dataset_of
from .common import check_init

log = logging.getLogger("gwtn")
FILES = ("model.pt", "stage.json", "metrics.jsonl", "DONE")

# The meaning of the key's settings. Version 1 keys (every teacher cached so far) were taken
# before the version was part of them, so it is hashed only from version 2 on.
KEY_VERSION = 1


def teacher_settings(cfg: Config) -> dict:
    """What decides a wide teacher's weights (the cache key is its hash)."""
    tree = to_dict(cfg)
    # How the data is read and scored, not what is trained on: not part of the key. The
    # section in its flat form (every dataset's keys), so that keys of teachers cached before
    # each dataset had its own section stay what they were.
    data = {k: v for k, v in flat_data_section(cfg.data).items()
            if k not in ("num_workers", "eval_batch_size", "eval_missing_ok")}
    wide = {k: v for k, v in tree["wide"].items() if k != "cache"}
    if cfg.wide.init:  # the same path may hold other weights later: key on what it holds
        check_init(cfg.wide.init, "wide.init")  # absent: the config's error, not an I/O one
        wide["init"] = _weights_sha256(Path(cfg.wide.init))
    else:  # keys of teachers trained before wide.init existed stay what they were
        wide.pop("init", None)
    if periods := dataset_of(cfg).test_split_identity(cfg):
        data["token_splits"] = periods
    # The model section in its flat form: keys of teachers cached before each family had its
    # own section stay what they were. Where the thin net imitates does not decide the
    # teacher: that key keeps its default (the one older keys were taken with).
    model = flat_model_section(cfg.model)
    model["imitation_points"] = flat_model_section(type(cfg.model)())["imitation_points"]
    # How the net is executed (torch.compile or eager) is not what it is: keys taken before
    # model.compile existed stay valid.
    model.pop("compile", None)
    settings = {"model": model, "data": data, "wide": wide, "seed": cfg.seed,
                "channels_last": cfg.channels_last, "precision": cfg.dist.precision}
    if KEY_VERSION > 1:
        settings["key_version"] = KEY_VERSION
    return settings


def _weights_sha256(path: Path) -> str:
    """The SHA-256 of a weights file, or of a folder's files (a Hugging Face folder: each
    file's name and contents, in name order)."""
    digest = hashlib.sha256()
    files = sorted(f for f in path.rglob("*") if f.is_file()) if path.is_dir() else [path]
    for file in files:
        if path.is_dir():
            digest.update(str(file.relative_to(path)).encode() + b"\0")
        with open(file, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def cache_dir(cfg: Config) -> Path | None:
    """This config's folder in the cache (None when ``wide.cache`` is off)."""
    if not cfg.wide.cache:
        return None
    text = json.dumps(teacher_settings(cfg), sort_keys=True)
    return Path(cfg.wide.cache) / hashlib.sha256(text.encode()).hexdigest()[:16]


def fetch(cfg: Config, stage_dir: Path) -> bool:
    """Copy a cached teacher into ``stage_dir`` (rank 0's job); False when there is none."""
    source = cache_dir(cfg)
    if source is None or not (source / "DONE").is_file():
        return False
    tmp = stage_dir.with_name(stage_dir.name + ".from-cache")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for name in FILES:
        shutil.copy2(source / name, tmp / name)
    shutil.rmtree(stage_dir, ignore_errors=True)  # an unfinished stage, superseded
    tmp.replace(stage_dir)
    log.info("wide: the teacher comes from the cache %s (not trained again)", source)
    return True


def store(cfg: Config, stage_dir: Path) -> None:
    """Put a finished wide stage into the cache (atomically: a whole folder or none)."""
    target = cache_dir(cfg)
    if target is None or (target / "DONE").is_file():
        return
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        for name in FILES:
            shutil.copy2(stage_dir / name, tmp / name)
        (tmp / "key.json").write_text(json.dumps(teacher_settings(cfg), indent=2))
    except BaseException:  # a full disk: no half-copied teacher left in the cache
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(target, ignore_errors=True)
    tmp.replace(target)
    log.info("wide: teacher stored in the cache %s", target)
