"""``gwtn export``: a stage's net in other libraries' formats.

A BERT: ``gwtn export RUN_DIR/finetune/model.pt OUT`` writes ``OUT/config.json`` and
``OUT/model.safetensors`` (``pytorch_model.bin`` where ``safetensors`` is not installed), plus
the shards' ``tokenizer.json`` when given (with a post-processor that adds ``[CLS]`` and
``[SEP]``), which ``BertForMaskedLM.from_pretrained(OUT)`` loads and which gives the same logits
as our model. Nothing here imports ``transformers``: the files are written from our own
parameter names through ``models/bert/names.py``, the table ``wide.init`` reads them back with.

A ResNet: ``OUT/model.pt`` (and ``OUT/model.safetensors`` where ``safetensors`` is installed),
a flat state dict under torchvision's names, which timm's ResNets share, and ``OUT/config.json``
with the shape (and the torchvision constructor, when one builds it).

Each family writes its own format (``Family.export``: ``models/bert/export.py``,
``models/resnet/export.py``); this module rebuilds the net from the weights' meta.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from . import checkpoint
from .config import ConfigError
from .models.family import family_for


class ExportError(ValueError):
    """The weights (or the tokenizer) cannot be exported."""


def _rebuild(blob: dict, weights: Path) -> nn.Module:
    """The net a stage's ``model.pt`` holds, built from the shape its meta records (weights
    saved before the meta named a family are a ResNet's)."""
    meta = blob.get("meta") if isinstance(blob, dict) else None
    if not isinstance(meta, dict) or "shape" not in meta:
        raise ExportError(f"{weights} is not a stage's model.pt (no family and shape in it)")
    try:
        family = family_for(meta.get("family", "resnet"))
    except ConfigError:
        raise ExportError(f"{weights} is not a stage's model.pt (no family and shape in it)"
                          ) from None
    try:
        model = family.build(family.shape_from_meta(meta["shape"]))
        model.load_state_dict(blob["state_dict"])
    except (TypeError, KeyError, RuntimeError) as exc:  # a meta or weights from elsewhere
        reason = " ".join(str(exc).split()) or type(exc).__name__
        raise ExportError(f"{weights}: its weights do not fit the shape it records "
                          f"({reason[:200]})") from exc
    return model


def export_weights(weights: Path, out: Path, tokenizer: Path | None = None) -> list[Path]:
    """Export a stage's ``model.pt`` (its meta records family and shape) to ``out``: a BERT as
    a Hugging Face folder, a ResNet as a torchvision-named state dict. Returns the files."""
    if not Path(weights).is_file():
        raise ExportError(f"{weights} not found")
    model = _rebuild(checkpoint.load(weights), weights)  # {"state_dict", "meta"}, read once
    return family_for(model).export(model, out, tokenizer)
