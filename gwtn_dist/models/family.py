"""Build the thin net and its wide twin from one ModelConfig, for either family.

``model.family`` picks a ResNet (images) or a BERT (masked-LM on text). Both kinds of net list
their blocks in forward order (``blocks()``) with the same names in the thin net and its twin,
and ``forward(x, upto=k)`` returns block k's output; everything else the stages need from a
family is here (shapes, depth of the deeper baseline, imitation points) or in
``stages/tasks.py`` (batches, losses, metrics).
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from ..config import ModelConfig
from . import bert, resnet
from .bert import Bert, BertShape
from .bert_names import load_hf_bert
from .resnet import ResNet, ResNetShape
from .resnet_names import load_resnet_weights
from .weights import read_state_dict

Depth = list[int] | int  # ResNet: blocks per stage; BERT: layers


def resnet_shape(cfg: ModelConfig, wide: bool, blocks: list[int] | None = None) -> ResNetShape:
    """The shape of the thin net (``wide=False``) or of its twin; ``blocks`` overrides the depth."""
    inner_mult = cfg.widen.inner_mult if wide else 1
    boundary_mult = cfg.widen.boundary_mult if wide else 1
    return ResNetShape(
        geometry=cfg.geometry,
        in_channels=cfg.in_channels,
        num_classes=cfg.num_classes,
        stem_width=cfg.stem_width * boundary_mult,
        blocks=tuple(blocks or cfg.blocks),
        inner_widths=tuple(w * inner_mult for w in cfg.inner_widths),
        boundary_widths=tuple(w * cfg.expansion * boundary_mult for w in cfg.inner_widths),
    )


def bert_shape(cfg: ModelConfig, wide: bool, layers: int | None = None) -> BertShape:
    """The thin BERT or its twin (each head and the feed-forward widened; the hidden size kept
    unless ``widen.boundary_mult`` > 1)."""
    w = cfg.widen
    hidden = cfg.hidden * (w.boundary_mult if wide else 1)
    return BertShape(vocab_size=cfg.vocab_size, hidden=hidden, layers=layers or cfg.layers,
                     heads=cfg.heads, head_dim=cfg.head_dim * (w.attention_mult if wide else 1),
                     ffn=cfg.ffn * (w.ffn_mult if wide else 1), max_len=cfg.max_len,
                     dropout=cfg.dropout)


def shape(cfg: ModelConfig, wide: bool, depth: Depth | None = None) -> ResNetShape | BertShape:
    """The shape of the thin net or its twin in ``cfg``'s family; ``depth`` overrides the depth."""
    if cfg.family == "bert":
        return bert_shape(cfg, wide, depth)
    return resnet_shape(cfg, wide, depth)


def shape_meta(cfg: ModelConfig, wide: bool, depth: Depth | None = None) -> dict:
    """What saved weights record to be rebuilt: the family and the shape's fields."""
    return {"family": cfg.family, "shape": shape(cfg, wide, depth).__dict__}


def build(s: ResNetShape | BertShape) -> ResNet | Bert:
    """The net of a shape (also how saved weights, whose meta holds the shape, are rebuilt)."""
    return Bert(s) if isinstance(s, BertShape) else ResNet(s)


def build_thin(cfg: ModelConfig, blocks: Depth | None = None) -> ResNet | Bert:
    """The thin (student) net; ``blocks`` gives a deeper variant for the baseline (a list of
    blocks per stage for a ResNet, a number of layers for a BERT)."""
    return build(shape(cfg, wide=False, depth=blocks))


def build_wide(cfg: ModelConfig) -> ResNet | Bert:
    """The widened twin: same depth and block names, wider inside (and optionally at boundaries)."""
    return build(shape(cfg, wide=True))


def needs_bridges(cfg: ModelConfig) -> bool:
    """Linear pairs are needed only where thin and wide boundary widths differ."""
    return cfg.widen.boundary_mult != 1


def imitation_points(model: nn.Module, cfg: ModelConfig) -> list[str]:
    """The points whose outputs are imitated, bottom to top (see each family's module)."""
    if isinstance(model, Bert):
        return bert.imitation_points(model)
    return resnet.imitation_points(model, cfg.imitation_points)


def deeper_depth(cfg: ModelConfig, deeper_blocks: list[int], deeper_layers: int) -> Depth:
    """The depth of the deeper-thin baseline: ``compare.deeper_blocks`` for a ResNet,
    ``compare.deeper_layers`` (0 = twice the thin net's layers) for a BERT."""
    if cfg.family == "bert":
        return deeper_layers or 2 * cfg.layers
    return deeper_blocks


def load_weights(model: ResNet | Bert, path: Path) -> None:
    """Load weights from outside into ``model``: for a ResNet a state dict in our, torchvision's
    or timm's names; for a BERT a Hugging Face BertForMaskedLM folder or a weights file in HF's
    or our names. Anything that does not fit raises a WeightsError naming the key."""
    if isinstance(model, Bert):
        load_hf_bert(model, Path(path))
    else:
        load_resnet_weights(model, read_state_dict(Path(path)))
