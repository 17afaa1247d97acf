"""What a model family gives the stages, and the registry that finds a family by name.

``model.family`` picks a family: ``resnet`` (``models/resnet/``, image classification) or
``bert`` (``models/bert/``, masked-LM on text); ``register_family`` adds another. Every family
builds nets that list their blocks in forward order (``blocks()``, a list of (name, module))
with the same names in the thin net and its wide twin, and whose ``forward(x, upto=k)`` returns
block k's output. Everything else the stages, bridges, comparisons, exports and the config
loader need from a family is a method of its ``Family``; no code outside a family's package
branches on which family it is.

A run resolves its family once (``spec.resolve`` → ``RunSpec.family``) and the stages use that.
The module-level functions (``build_thin``, ``build_wide``, ``shape_meta``, …) look the family
up from a config, a net or saved weights each call: they are for tools and tests that hold one
of those, not for the stages.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch import nn

from ..config import ConfigError, ModelConfig
from . import BUILTIN_FAMILIES

if TYPE_CHECKING:
    from ..config import Config
    from .bridge import Bridges
    from .task import ScoredTask

Depth = list[int] | int  # a family's depth: ResNet: blocks per stage; BERT: layers
Shape = Any  # a family's frozen shape dataclass; its ``family`` class attribute names the family


class Family(Protocol):
    """One model family: its nets, its task, and its part of the config.

    Nets are ``nn.Module`` s with ``blocks()`` → [(name, module)] in forward order (the first is
    the stem or the embeddings), ``forward(x, upto=k)`` → block k's output, ``run_blocks(h,
    start, end, …)`` → blocks start..end run on h, and a ``family`` attribute naming their
    family. A shape is a frozen dataclass of everything that fixes a net's tensor shapes; its
    fields (``shape.__dict__``) are what saved weights record as ``{"family", "shape"}``.
    """

    name: str  # the value of ``model.family``
    # The ``model`` section's dataclass: it also names the datasets the family trains on
    # (``DATASETS``) and checks the family's keys (``check``), without importing torch.
    config_class: type[ModelConfig]
    depth_label: str  # what the deeper baseline's depth counts ("blocks", "layers")
    docs: str  # the docs page that describes the family's shapes and weights
    lift_only: bool  # bridges are lifts P only (no trained back map Q; see models/bridge.py)
    takes_images: bool  # nets take (B, model.in_channels, H, W) images (the step benchmarks' input)

    def shape(self, m: ModelConfig, wide: bool, depth: Depth | None = None) -> Shape:
        """The thin net's shape (``wide=False``) or its twin's; ``depth`` overrides the depth."""

    def shape_from_meta(self, fields: dict) -> Shape:
        """The shape saved weights recorded as ``meta["shape"]`` (JSON/pickle: lists for tuples)."""

    def build(self, shape: Shape) -> nn.Module:
        """A fresh net of ``shape``; the RNG draws are those of the family's constructor."""

    def thin_depth(self, m: ModelConfig) -> Depth:
        """The thin net's depth, as reports print it."""

    def deeper_depth(self, cfg: Config) -> Depth:
        """The depth of the deeper-thin baseline (from ``cfg.compare``)."""

    def imitation_points(self, model: nn.Module, m: ModelConfig) -> list[str]:
        """The names of the points whose outputs are imitated, bottom to top."""

    def point_index(self, model: nn.Module, point: str) -> int:
        """Index into ``model.blocks()`` of the block whose output is ``point``."""

    def boundary_width(self, model: nn.Module, point: str) -> int:
        """The width of ``point``'s output (channels c of (B, c, H, W), hidden D of (B, T, D))."""

    def merge_pairs(self, thin: nn.Module, bridges: Bridges, skip: list[str]) -> None:
        """Fold every pair's Q P (c × c) into the thin layers that consume its point's output,
        in place, except at the points in ``skip``; only called when pairs have a back map."""

    def task(self, cfg: Config) -> ScoredTask:
        """The task: batches on the device, scored outputs, metrics, imitated features
        (``models/task.py`` describes the interface)."""

    def init_head(self, cfg: Config, thin: nn.Module, wide: nn.Module, bridges: Bridges | None,
                  last_point: str) -> str:
        """Start the thin net's head from the wide one (``wide``: the frozen teacher, a
        ``distributed.teacher.Teacher``) after imitation where
        ``imitate.init_head`` asks for it and it can read the thin features; returns ``"wide"``
        or ``"random"`` (the head left as it was)."""

    def load_weights(self, model: nn.Module, path: Path) -> None:
        """Load weights from outside (other libraries' names and formats) into ``model``;
        raise WeightsError naming the tensor for anything that does not fit."""

    def export(self, model: nn.Module, out: Path, tokenizer: Path | None) -> list[Path]:
        """Write ``model`` in another library's format into folder ``out``; returns the files.
        Raises ExportError (``export_hf``) for what cannot be exported."""

    def synthetic_batch(self, cfg: Config, batch_size: int,
                        generator: torch.Generator) -> tuple[Any, torch.Tensor]:
        """A random (x, y) batch of the task's shapes, as the data would give it (benchmarks
        that time steps without reading data)."""


_families: dict[str, Family] = {}
# The families that come with gwtn_dist, imported on first use (they import torch; the config
# module loads their config classes only).
_BUILTIN = {name: f"{package}.family" for name, package in BUILTIN_FAMILIES.items()}


def register_family(name: str, family: Family) -> None:
    """Make ``family`` the one ``model.family: name`` selects (replacing any before it), and
    its config class that ``model`` section's."""
    _families[name] = family
    ModelConfig.register(name, family.config_class)


def known_families() -> dict[str, Family]:
    """Every registered family by name, the built-in ones included."""
    for module in _BUILTIN.values():
        importlib.import_module(module)
    return dict(_families)


def family_for(what: Any) -> Family:
    """The family of a name, a config (``Config`` or its ``model`` section), a net or a shape
    (anything with a ``family`` attribute naming it). An unknown name is a ConfigError naming
    ``model.family`` and the known families."""
    name = what if isinstance(what, str) else getattr(getattr(what, "model", what), "family", None)
    if name not in _families and name in _BUILTIN:
        importlib.import_module(_BUILTIN[name])
    if name not in _families:
        raise ConfigError(f"model.family: {name!r} is not a known family; known: "
                          f"{', '.join(sorted(known_families()))}")
    return _families[name]


def _shape(m: ModelConfig, wide: bool, depth: Depth | None = None) -> Shape:
    return family_for(m).shape(m, wide, depth)


def shape_meta(m: ModelConfig, wide: bool, depth: Depth | None = None) -> dict:
    """What saved weights record to be rebuilt: the family and the shape's fields."""
    return {"family": m.family, "shape": _shape(m, wide, depth).__dict__}


def build_shape(s: Shape) -> nn.Module:
    """The net of a shape (also how saved weights, whose meta holds the shape, are rebuilt)."""
    return family_for(s).build(s)


def build_thin(m: ModelConfig, blocks: Depth | None = None) -> nn.Module:
    """The thin (student) net; ``blocks`` gives a deeper variant for the baseline (in the
    family's depth: blocks per stage for a ResNet, a number of layers for a BERT)."""
    return build_shape(_shape(m, wide=False, depth=blocks))


def build_wide(m: ModelConfig) -> nn.Module:
    """The widened twin: same depth and block names, wider inside (and optionally at boundaries)."""
    return build_shape(_shape(m, wide=True))


def needs_bridges(m: ModelConfig) -> bool:
    """Linear pairs are needed only where thin and wide boundary widths differ."""
    return m.widen.boundary_mult != 1
