"""The placeholders of ``run_dir`` (``{date}``, ``{seed}``): which it may hold, and filling
them when a command starts a run."""

from __future__ import annotations

import dataclasses
import re
import time

from .schema import Config, ConfigError

RUN_DIR_FIELDS = ("date", "seed")


def check_run_dir(run_dir: str) -> None:
    """Refuse braces in ``run_dir`` other than the ``{date}`` and ``{seed}`` placeholders."""
    rest = re.sub(r"\{(?:date|seed)\}", "", run_dir)
    if "{" in rest or "}" in rest:
        raise ConfigError(f"run_dir: {run_dir!r} may hold only the placeholders "
                          f"{{date}} and {{seed}}")


def date_stamp(when: float | None = None) -> str:
    """The ``{date}`` of a run folder: local time as YYYYmmdd-HHMMSS."""
    return time.strftime("%Y%m%d-%H%M%S", time.localtime(when))


def fill_run_dir(cfg: Config, stamp: str, *, continuing: bool = False) -> Config:
    """``cfg`` with ``{date}`` (as ``stamp``) and ``{seed}`` filled in ``run_dir``.

    A ``{date}`` names a new folder at every start, so it cannot name a run to continue:
    with ``resume=true`` or ``continuing`` (``gwtn imitate|finetune``) it is a ConfigError.
    """
    if "{date}" in cfg.run_dir and (cfg.resume or continuing):
        raise ConfigError(f"run_dir: {cfg.run_dir!r} has {{date}}, which names a new folder at "
                          f"every start; to continue a run, give its folder (run_dir=…)")
    run_dir = cfg.run_dir.replace("{date}", stamp).replace("{seed}", str(cfg.seed))
    return dataclasses.replace(cfg, run_dir=run_dir)
