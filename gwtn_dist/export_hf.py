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

import torch
from torch import nn
from torch.nn.modules.module import register_module_parameter_registration_hook

from . import checkpoint
from .checkpoint import CheckpointError
from .config import ConfigError
from .models.family import family_for


class ExportError(ValueError):
    """The weights (or the tokenizer) cannot be exported."""


def _rebuild(blob: dict, weights: Path) -> nn.Module:
    """The net a stage's ``model.pt`` holds, built from the shape its meta records (weights
    saved before the meta named a family are a ResNet's). A meta or weights that do not make
    a net are a ``CheckpointError`` naming the file (exit 4): the shape is first built on the
    meta device (no memory) and checked against the weights, so a crafted shape allocates
    nothing."""
    meta = blob.get("meta") if isinstance(blob, dict) else None
    if not isinstance(meta, dict) or "shape" not in meta:
        raise CheckpointError(f"{weights} is not a stage's model.pt (no family and shape in it)")
    try:
        family = family_for(meta.get("family", "resnet"))
    except (ConfigError, TypeError):
        raise CheckpointError(f"{weights} is not a stage's model.pt (its family "
                              f"{meta.get('family')!r} is not one gwtn knows)") from None
    state = blob.get("state_dict")
    tensors = len(state) if isinstance(state, dict) else 0
    try:
        shape = family.shape_from_meta(meta["shape"])
        empty = _build_on_meta(family, shape, tensors)
    except Exception as exc:  # any failure to build: a shape from elsewhere
        reason = " ".join(str(exc).split()) or type(exc).__name__
        raise CheckpointError(f"{weights}: the shape it records cannot be built "
                              f"({reason[:200]})") from exc
    checkpoint.check_state(empty, state, weights)
    model = family.build(shape)  # no larger than the weights it was just checked against
    model.load_state_dict(blob["state_dict"])
    return model


class _LargerThanTheWeights(ValueError):
    pass


def _build_on_meta(family, shape, tensors: int) -> nn.Module:
    """``family.build(shape)`` on the meta device, stopped as soon as it has registered more
    parameters than the file holds tensors (such a net cannot be the file's; a crafted
    ``blocks: [10**9, …]`` would otherwise build for hours)."""
    made = 0

    def count(module, name, param):
        nonlocal made
        made += 1
        if made > tensors:
            raise _LargerThanTheWeights(f"a net with more parameters than the {tensors} "
                                        f"tensors the file holds")

    handle = register_module_parameter_registration_hook(count)
    try:
        with torch.device("meta"):
            return family.build(shape)
    finally:
        handle.remove()


def export_weights(weights: Path, out: Path, tokenizer: Path | None = None) -> list[Path]:
    """Export a stage's ``model.pt`` (its meta records family and shape) to ``out``: a BERT as
    a Hugging Face folder, a ResNet as a torchvision-named state dict. Returns the files."""
    if not Path(weights).is_file():
        raise ExportError(f"{weights} not found")
    model = _rebuild(checkpoint.load(weights), weights)  # {"state_dict", "meta"}, read once
    return family_for(model).export(model, out, tokenizer)
