"""Loading a config: YAML read with every key once, dotted overrides applied, the tree built
into a ``Config`` and checked (``load_config``, ``config_from_dict``, ``with_overrides``), and
the resolved config written back (``dump_config``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from .coerce import _set_dotted, build_config, to_dict
from .schema import Config, ConfigError
from .validate import validate


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, except that a key given twice in one mapping is an error (PyYAML
    keeps the last silently, so a typo'd second ``lr:`` would win unseen)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"the key {key!r} is given twice", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _yaml(text: str, where: str) -> Any:
    """Parse YAML; a syntax error or a key given twice is a ConfigError naming ``where`` and
    the parser's reason."""
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)  # a SafeLoader: plain data only
    except yaml.YAMLError as exc:
        reason = " ".join(str(exc).split())
        raise ConfigError(f"{where}: not valid YAML ({reason})") from None


def _parse_scalar(text: str, key: str = "override") -> Any:
    """An override's value is read as YAML, so ``3``, ``0.1``, ``true``, ``[2,2]`` keep their
    types."""
    return _yaml(text, key) if text != "" else ""


def apply_overrides(tree: dict, overrides: list[str]) -> dict:
    """Apply ``key.sub=value`` strings to a nested dict (in place) and return it."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key.sub=value")
        key, text = item.split("=", 1)
        _set_dotted(tree, key.strip(), _parse_scalar(text, f"override {item!r}"))
    return tree


def config_from_dict(tree: dict) -> Config:
    """Build and validate a Config from a nested dict (e.g. a parsed YAML file)."""
    old = "baselines" if "baselines" in tree else \
        "compare.arms" if isinstance(tree.get("compare"), dict) and "arms" in tree["compare"] \
        else None
    if old:
        raise ConfigError(f"{old}: replaced by the one top-level list `arms` (what gwtn run "
                          f"trains and gwtn compare compares), e.g. arms: [scratch, kd, win]")
    cfg = build_config(tree)
    validate(cfg)
    return cfg


def load_config(path: str | Path | None, overrides: list[str] = ()) -> Config:
    """Read a YAML config (or start from defaults when ``path`` is None) and apply overrides."""
    tree: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            text = path.read_bytes().decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ConfigError(f"{path}: not UTF-8 text (byte {exc.start}); save it as UTF-8"
                              ) from None
        loaded = _yaml(text, str(path))
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of keys")
        tree = loaded or {}
    apply_overrides(tree, list(overrides))
    return config_from_dict(tree)


def with_overrides(cfg: Config, values: dict[str, Any]) -> Config:
    """A copy of ``cfg`` with dotted keys set to values (checked like a loaded config)."""
    tree = to_dict(cfg)
    for key, value in values.items():
        _set_dotted(tree, key, value)
    return config_from_dict(tree)


def dump_config(cfg: Config, path: str | Path) -> None:
    """Write the resolved config as YAML (what the run actually used), atomically: a full disk
    leaves the old file or none, never a torn one that a resume would read."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
        tmp.replace(path)
    except OSError as exc:  # a full disk: name the file
        raise OSError(exc.errno, exc.strerror, str(path)) from exc
    finally:
        tmp.unlink(missing_ok=True)

