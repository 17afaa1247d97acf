"""``gwtn export``: a stage's net in other libraries' formats.

A BERT: ``gwtn export RUN_DIR/finetune/model.pt OUT`` writes ``OUT/config.json`` and
``OUT/model.safetensors`` (``pytorch_model.bin`` where ``safetensors`` is not installed), plus
the shards' ``tokenizer.json`` when given (with a post-processor that adds ``[CLS]`` and
``[SEP]``), which ``BertForMaskedLM.from_pretrained(OUT)`` loads and which gives the same logits
as our model. Nothing here imports ``transformers``: the files are written from our own
parameter names through ``models/bert_names.py``, the table ``wide.init`` reads them back with.

A ResNet: ``OUT/model.pt`` (and ``OUT/model.safetensors`` where ``safetensors`` is installed),
a flat state dict under torchvision's names, which timm's ResNets share, and ``OUT/config.json``
with the shape (and the torchvision constructor, when one builds it).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from . import checkpoint
from .models.bert import Bert, BertShape
from .models.bert_names import hf_config, hf_state_dict
from .models.resnet import ResNet, ResNetShape
from .models.resnet_names import torchvision_arch, torchvision_state_dict
from .models.weights import WeightsError


class ExportError(ValueError):
    """The weights (or the tokenizer) cannot be exported."""


def _save_tensors(tensors: dict[str, torch.Tensor], out: Path, stem: str) -> Path:
    """``OUT/model.safetensors`` when safetensors is installed, else ``OUT/<stem>``."""
    if checkpoint.safetensors_available():
        path = out / "model.safetensors"
        checkpoint.save_safetensors(tensors, path)
    else:
        path = out / stem
        checkpoint.atomic_save(tensors, path)
    return path


def bert_tokenizer(path: Path):
    """A WordPiece ``tokenizer.json`` with a post-processor that wraps every encoding in
    ``[CLS] … [SEP]`` (our shard writer adds them itself, so the shards' file has none)."""
    from tokenizers import Tokenizer, processors

    try:
        tok = Tokenizer.from_file(str(path))
    except Exception as exc:  # the library's errors carry no common type
        reason = " ".join(str(exc).split())
        raise ExportError(f"{path} is not a tokenizers JSON file ({reason})") from exc
    ids = {s: tok.token_to_id(s) for s in ("[CLS]", "[SEP]")}
    if None in ids.values():
        raise ExportError(f"{path} lacks [CLS] or [SEP]; train it with `gwtn tokenizer train`")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=list(ids.items()))
    return tok


def export_model(model: Bert, out: Path, tokenizer: Path | None = None) -> list[Path]:
    """Write ``model`` (and the tokenizer, wrapped by ``bert_tokenizer``) as a BertForMaskedLM
    folder ``out``; returns the files written."""
    try:  # the names both ways live in models/bert_names.py (wide.init reads them back)
        config, tensors = hf_config(model.shape), hf_state_dict(model)
    except WeightsError as exc:
        raise ExportError(str(exc)) from None
    tok = bert_tokenizer(tokenizer) if tokenizer is not None else None  # checked before writing
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    files = [out / "config.json", _save_tensors(tensors, out, "pytorch_model.bin")]
    if tok is not None:
        tok.save(str(out / "tokenizer.json"))
        # Lets AutoTokenizer.from_pretrained(out) read tokenizer.json as a fast tokenizer.
        (out / "tokenizer_config.json").write_text(json.dumps({
            "tokenizer_class": "PreTrainedTokenizerFast",
            "model_max_length": model.shape.max_len, "pad_token": "[PAD]", "unk_token": "[UNK]",
            "cls_token": "[CLS]", "sep_token": "[SEP]", "mask_token": "[MASK]"}, indent=2))
        files += [out / "tokenizer.json", out / "tokenizer_config.json"]
    return files


def export_resnet(model: ResNet, out: Path) -> list[Path]:
    """Write ``model`` as a torchvision/timm-named state dict in ``out``; returns the files."""
    out.mkdir(parents=True, exist_ok=True)
    tensors = torchvision_state_dict(model)
    files = [out / "model.pt"]
    checkpoint.atomic_save(tensors, files[0])
    if checkpoint.safetensors_available():
        files.append(out / "model.safetensors")
        checkpoint.save_safetensors(tensors, files[-1])
    config = {"family": "resnet", "naming": "torchvision", "shape": model.shape.__dict__,
              "torchvision_arch": torchvision_arch(model.shape)}
    (out / "config.json").write_text(json.dumps(config, indent=2))
    return [*files, out / "config.json"]


def _rebuild(blob: dict, weights: Path) -> Bert | ResNet:
    """The net a stage's ``model.pt`` holds, built from the shape its meta records."""
    meta = blob.get("meta") if isinstance(blob, dict) else None
    if not isinstance(meta, dict) or "shape" not in meta or \
            meta.get("family", "resnet") not in ("bert", "resnet"):
        raise ExportError(f"{weights} is not a stage's model.pt (no family and shape in it)")
    try:
        if meta.get("family", "resnet") == "bert":
            model = Bert(BertShape(**meta["shape"]))
        else:
            model = ResNet(ResNetShape(**{k: tuple(v) if isinstance(v, list) else v
                                          for k, v in meta["shape"].items()}))
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
    if isinstance(model, Bert):
        return export_model(model, out, tokenizer)
    if tokenizer is not None:
        raise ExportError("--tokenizer goes with a BERT; this is a ResNet")
    return export_resnet(model, out)
