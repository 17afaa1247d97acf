"""Plain dicts to config dataclasses and back: each value checked against its field's type,
with errors that name the dotted key (``_build``), and the dotted-key edits of a tree.

Below loading and validation, so that both (and the regime check, which builds each cell's
config) can use it without importing each other.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from typing import Any, Literal, get_args, get_origin

from .schema import Config, ConfigError


def _type_name(tp: Any) -> str:
    if get_origin(tp) is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    return getattr(tp, "__name__", str(tp))


def _section(value: Any, tp: Any, key: str) -> Any:
    if not isinstance(value, dict):
        raise ConfigError(f"{key}: expected a mapping of {tp.__name__} fields, got {value!r}")
    if getattr(tp, "TAG", None):
        tp = _variant(tp, value, key)
    return _build(tp, value, key + ".")


def _choice(value: Any, tp: Any, key: str) -> Any:
    if value not in get_args(tp):
        raise ConfigError(f"{key}: {value!r} is not allowed; choose one of {_type_name(tp)}")
    return value


def _list(value: Any, tp: Any, key: str) -> list:
    (item_tp,) = get_args(tp)
    if not isinstance(value, (list, tuple)):
        raise ConfigError(f"{key}: expected a list of {_type_name(item_tp)}, got {value!r}")
    return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]


def _mapping(value: Any, tp: Any, key: str) -> dict:
    if not isinstance(value, dict):
        raise ConfigError(f"{key}: expected a mapping, got {value!r}")
    return value


def _bool(value: Any, tp: Any, key: str) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    return value


def _int(value: Any, tp: Any, key: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if not -(2**63) <= value < 2**63:  # torch, numpy and C libraries overflow past int64
        raise ConfigError(f"{key}: {value} does not fit in 64 bits")
    return value


def _float(value: Any, tp: Any, key: str) -> float:
    if isinstance(value, str):  # PyYAML (YAML 1.1) reads 1e-3 as a string, not a float
        try:
            value = float(value)
        except ValueError:
            pass
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if not math.isfinite(value):  # NaN passes every `<` check, so refuse it here
        raise ConfigError(f"{key}: expected a finite number, got {value!r}")
    return float(value)


def _str(value: Any, tp: Any, key: str) -> str:
    if not isinstance(value, str):
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    return value


# The coercer of each plain field type (``tp is X``) and of each generic one (its origin).
_PLAIN = {dict: _mapping, bool: _bool, int: _int, float: _float, str: _str}
_GENERIC = {Literal: _choice, list: _list}


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """``value`` checked against the field type ``tp`` (a float field also takes an int or a
    number YAML left as a string); ConfigError naming ``key`` when it does not fit."""
    if dataclasses.is_dataclass(tp):
        return _section(value, tp, key)
    origin = get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        raise TypeError(f"{key}: union types are not supported in configs")
    coerce = _GENERIC.get(origin) or (_PLAIN.get(tp) if origin is None else None)
    if coerce is None:
        raise TypeError(f"{key}: unsupported config type {tp!r}")
    return coerce(value, tp, key)


def _variant(tp: type, data: dict, key: str) -> type:
    """The class of a tagged section (a dataclass with a ``TAG``, ``variants()`` and the
    ``NOUN`` its errors call a variant: ``model``, ``dataset``): the one its tag key selects,
    checked so that a key of another variant is an error naming it."""
    variants = tp.variants()
    name = data.get(tp.TAG, getattr(tp, tp.TAG))
    if name not in variants:
        raise ConfigError(f"{key}.{tp.TAG}: {name!r} is not allowed; choose one of "
                          f"{' | '.join(repr(v) for v in variants)}")
    cls = variants[name]
    own = [f.name for f in dataclasses.fields(cls)]
    for k in data:
        others = [v for v, c in variants.items() if k in {f.name for f in dataclasses.fields(c)}]
        if k not in own and others:
            raise ConfigError(f"{key}.{k} is not a key of a {name} {tp.NOUN} (it is a "
                              f"{' and '.join(others)} key; {key}.{tp.TAG} selects the "
                              f"keys); allowed here: {', '.join(own)}")
    return cls


def _build(cls: type, data: dict, prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for k in data:
        if k not in names:
            raise ConfigError(f"unknown key {prefix}{k}; allowed here: {', '.join(names)}")
    default = cls()
    kwargs = {}
    for name in names:
        if name in data:
            kwargs[name] = _coerce(data[name], hints[name], prefix + name)
        else:
            kwargs[name] = getattr(default, name)
    return cls(**kwargs)


def build_config(tree: dict) -> Config:
    """A Config from a nested dict, every key and value checked against its field, the
    cross-field checks (``validate``) not yet made."""
    return _build(Config, tree)


def to_dict(cfg: Config) -> dict:
    """``cfg`` as a nested dict of plain values (what ``config.yaml`` holds)."""
    return dataclasses.asdict(cfg)


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{dotted}: {part} is a value, not a section")
        node = child
    node[parts[-1]] = value
