"""Export a thin BERT in Hugging Face's format, for fine-tuning with ``transformers``.

``gwtn export RUN_DIR/finetune/model.pt OUT`` writes ``OUT/config.json`` and
``OUT/pytorch_model.bin`` (plus the shards' ``tokenizer.json`` when given), which
``BertForMaskedLM.from_pretrained(OUT)`` loads and which gives the same logits as our model.
Nothing here imports ``transformers``: the files are written from our own parameter names.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from . import checkpoint
from .models.bert import Bert, BertShape

# Our names (suffixes of a layer's parameters) → Hugging Face's, inside bert.encoder.layer.I.
_LAYER_NAMES = {
    "attention.query": "attention.self.query",
    "attention.key": "attention.self.key",
    "attention.value": "attention.self.value",
    "attention.output": "attention.output.dense",
    "attention_norm": "attention.output.LayerNorm",
    "intermediate": "intermediate.dense",
    "output": "output.dense",
    "output_norm": "output.LayerNorm",
}


class ExportError(ValueError):
    """The weights cannot be written as a Hugging Face BertForMaskedLM."""


def hf_config(shape: BertShape) -> dict:
    """The ``config.json`` of a BertForMaskedLM with this shape."""
    if shape.attention_width != shape.hidden:
        raise ExportError(
            f"Hugging Face's BERT needs heads × head_dim = hidden; this net has {shape.heads} × "
            f"{shape.head_dim} = {shape.attention_width} and hidden {shape.hidden} (a wide twin "
            f"does not export; its thin net does)"
        )
    return {
        "architectures": ["BertForMaskedLM"],
        "model_type": "bert",
        "vocab_size": shape.vocab_size,
        "hidden_size": shape.hidden,
        "num_hidden_layers": shape.layers,
        "num_attention_heads": shape.heads,
        "intermediate_size": shape.ffn,
        "hidden_act": "gelu",
        "hidden_dropout_prob": shape.dropout,
        "attention_probs_dropout_prob": shape.dropout,
        "max_position_embeddings": shape.max_len,
        "type_vocab_size": shape.type_vocab_size,
        "initializer_range": 0.02,
        "layer_norm_eps": shape.layer_norm_eps,
        "pad_token_id": 0,
        "position_embedding_type": "absolute",
        "tie_word_embeddings": True,
    }


def hf_state_dict(model: Bert) -> dict[str, torch.Tensor]:
    """Our parameters under BertForMaskedLM's names (the tied decoder written out too)."""
    out = {}
    for name, value in model.state_dict().items():
        value = value.detach().cpu().contiguous()
        if name.startswith("embeddings."):
            out[f"bert.{name}"] = value
        elif name.startswith("layer."):
            _, index, rest = name.split(".", 2)
            module, kind = rest.rsplit(".", 1)
            out[f"bert.encoder.layer.{index}.{_LAYER_NAMES[module]}.{kind}"] = value
        elif name == "mlm.bias":
            out["cls.predictions.bias"] = value
        elif name.startswith("mlm."):
            out[f"cls.predictions.transform.{name[len('mlm.'):]}"] = value
        else:
            raise ExportError(f"no Hugging Face name for parameter {name!r}")
    out["cls.predictions.decoder.weight"] = out["bert.embeddings.word_embeddings.weight"].clone()
    return out


def export_model(model: Bert, out: Path, tokenizer: Path | None = None) -> Path:
    """Write ``model`` as a BertForMaskedLM folder ``out``; returns ``out``."""
    config = hf_config(model.shape)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    checkpoint.atomic_save(hf_state_dict(model), out / "pytorch_model.bin")
    if tokenizer is not None:
        shutil.copyfile(tokenizer, out / "tokenizer.json")
        # Lets AutoTokenizer.from_pretrained(out) read tokenizer.json as a fast tokenizer.
        (out / "tokenizer_config.json").write_text(json.dumps({
            "tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": model.shape.max_len,
            "pad_token": "[PAD]", "unk_token": "[UNK]", "cls_token": "[CLS]",
            "sep_token": "[SEP]", "mask_token": "[MASK]"}, indent=2))
    return out


def export_weights(weights: Path, out: Path, tokenizer: Path | None = None) -> Path:
    """Export a BERT stage's ``model.pt`` (its meta records the shape) to ``out``."""
    if not Path(weights).is_file():
        raise ExportError(f"{weights} not found")
    blob = checkpoint.load(weights)  # {"state_dict", "meta"}, read once
    meta = blob["meta"]
    if meta.get("family") != "bert":
        raise ExportError(f"{weights} holds a {meta.get('family', 'resnet')} net, not a BERT")
    model = Bert(BertShape(**meta["shape"]))
    model.load_state_dict(blob["state_dict"])
    return export_model(model, out, tokenizer)
