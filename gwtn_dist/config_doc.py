"""``gwtn config``: the resolved config as YAML, each key with one line of help.

The help is read from the config dataclasses' docstrings, which describe a field as
``name: text``: a field's help is that text up to the end of its first clause (``;`` or a
sentence's end, outside parentheses), a section's is the first sentence of its class
docstring. A field the docstring does not describe that way gets no comment. The YAML loads
back as the same config (``gwtn config C > resolved.yaml; gwtn run resolved.yaml``).
"""

from __future__ import annotations

import dataclasses
import inspect
import re
from typing import Any

import yaml

from .config import Config

MAX_HELP = 110  # characters of a help comment


def _clause(text: str, stops: str) -> str:
    """``text`` up to the first of ``stops`` (or a sentence's end) outside parentheses."""
    depth = 0
    for i, ch in enumerate(text):
        depth += {"(": 1, ")": -1}.get(ch, 0)
        if depth > 0:
            continue
        end = ch == "." and (i + 1 == len(text) or text[i + 1] == " ")
        if ch in stops or (end and not text[:i + 1].endswith(("e.g.", "i.e.", "etc."))):
            return text[:i]
    return text


def _one_line(text: str) -> str:
    text = text.replace("``", "`").strip()
    return text if len(text) <= MAX_HELP else text[:MAX_HELP - 1].rstrip() + "…"


def _doc(cls: type) -> str:
    return " ".join((inspect.getdoc(cls) or "").split())


def section_help(cls: type) -> str:
    """The first sentence of a config dataclass's docstring."""
    return _one_line(_clause(_doc(cls), ""))


def field_help(cls: type) -> dict[str, str]:
    """``{field: one line}`` for the fields that ``cls``'s docstring describes as ``name: …``,
    or failing that the docstring of a class it derives from (a family's ``model`` section
    finds ``family`` described on ``ModelConfig``, the section all families share)."""
    out = {}
    for f in dataclasses.fields(cls):
        for base in cls.__mro__:
            # Not after a dot or a backquote: ``data.dataset: text`` is an example, not a field.
            found = re.search(rf"(?<![\w.`]){re.escape(f.name)}: (.+)", _doc(base))
            if dataclasses.is_dataclass(base) and found:
                out[f.name] = _one_line(_clause(found.group(1), ";"))
                break
    return out


def _comment(text: str | None) -> str:
    return f"  # {text}" if text else ""


def _lines(obj: Any, indent: int) -> list[str]:
    pad, helps, lines = "  " * indent, field_help(type(obj)), []
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            lines.append(f"{pad}{f.name}:{_comment(section_help(type(value)))}")
            lines += _lines(value, indent + 1)
            continue
        # Lists and mappings of scalars in flow style ([4, 4, 4]), a scalar as ``key: value``.
        flow = None if isinstance(value, (list, dict)) else False
        dumped = yaml.safe_dump({f.name: value}, sort_keys=False, default_flow_style=flow,
                                width=1 << 16, allow_unicode=True).rstrip("\n").splitlines()
        # A comment goes on a line that ends the value or opens a block, never inside a scalar.
        fits = len(dumped) == 1 or dumped[0] == f"{f.name}:"
        lines.append(pad + dumped[0] + (_comment(helps.get(f.name)) if fits else ""))
        lines += [pad + line for line in dumped[1:]]
    return lines


def commented_yaml(cfg: Config) -> str:
    """``cfg`` as YAML, every key present (defaults included), with help comments."""
    return "\n".join(_lines(cfg, 0)) + "\n"
