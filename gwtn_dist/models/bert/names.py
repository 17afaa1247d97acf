"""Our BERT's parameter names ↔ Hugging Face's ``BertForMaskedLM``, both ways, in one table.

The nets differ in names only (``models/bert/net.py`` keeps HF's tensor layouts): ours are
``embeddings.*``, ``layer.I.*`` and ``mlm.*``; HF's are ``bert.embeddings.*``,
``bert.encoder.layer.I.*`` and ``cls.predictions.*``. HF's decoder weight is tied to the word
embeddings (ours is the embedding itself), so a folder's ``cls.predictions.decoder.weight``, when
written, must equal them. ``gwtn export`` writes with :func:`hf_state_dict` and
:func:`hf_config`; ``wide.init`` and ``imitate.init`` read with :func:`load_hf_bert`.

A Hugging Face BERT always has heads × head_dim = hidden. Our thin net does too when it is
exportable, but a wide twin widens each head (``widen.attention_mult``) at the same hidden size
(``widen.boundary_mult``), so an HF model can fill a twin only where
``head_dim × attention_mult × heads = hidden × boundary_mult``, i.e. ``attention_mult`` equals
``boundary_mult`` (its feed-forward width ``ffn × ffn_mult`` may be anything).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..weights import WeightsError, load_mapped, read_state_dict
from .net import Bert, BertShape

# Our module names inside layer.I → Hugging Face's inside bert.encoder.layer.I.
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
_HF_LAYER_NAMES = {hf: ours for ours, hf in _LAYER_NAMES.items()}
# Whole-name prefixes outside the layers: (ours, HF's).
_PREFIXES = (("embeddings.", "bert.embeddings."), ("mlm.bias", "cls.predictions.bias"),
             ("mlm.", "cls.predictions.transform."))
DECODER = "cls.predictions.decoder.weight"
# HF tensors our net has no use for: buffers, the pooler and next-sentence head of a
# BertForPreTraining folder, and the decoder bias (HF ties it to cls.predictions.bias).
_IGNORED = ("bert.embeddings.position_ids", "bert.embeddings.token_type_ids", "bert.pooler.",
            "cls.seq_relationship.", "cls.predictions.decoder.bias")
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


def hf_name(ours: str) -> str:
    """Hugging Face's name of one of our parameter names (KeyError when it has none)."""
    if ours.startswith("layer."):
        _, index, rest = ours.split(".", 2)
        module, kind = rest.rsplit(".", 1)
        return f"bert.encoder.layer.{index}.{_LAYER_NAMES[module]}.{kind}"
    for mine, theirs in _PREFIXES:
        if ours.startswith(mine):
            return theirs + ours[len(mine):]
    raise KeyError(ours)


def our_name(name: str) -> str | None:
    """Our name of a Hugging Face name (our own names come back unchanged); None for the HF
    tensors our net does not use; KeyError for a name that is neither."""
    if name.startswith(_IGNORED) or name == DECODER:
        return None
    if name.startswith("bert.encoder.layer."):
        index, rest = name[len("bert.encoder.layer."):].split(".", 1)
        module, kind = rest.rsplit(".", 1)
        if module in _HF_LAYER_NAMES:
            return f"layer.{index}.{_HF_LAYER_NAMES[module]}.{kind}"
        raise KeyError(name)
    for mine, theirs in _PREFIXES:
        if name.startswith(theirs):
            return mine + name[len(theirs):]
    if name.startswith(("embeddings.", "layer.", "mlm.")):
        return name
    raise KeyError(name)


def hf_config(shape: BertShape) -> dict:
    """The ``config.json`` of a BertForMaskedLM with this shape."""
    if shape.attention_width != shape.hidden:
        raise WeightsError(
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
        try:
            out[hf_name(name)] = value.detach().cpu().contiguous()
        except KeyError:
            raise WeightsError(f"no Hugging Face name for parameter {name!r}") from None
    out[DECODER] = out["bert.embeddings.word_embeddings.weight"].clone()
    return out


def read_hf_bert(path: Path) -> tuple[dict | None, dict[str, torch.Tensor]]:
    """``(config.json as a dict, tensors)`` of a ``save_pretrained`` folder (model.safetensors
    or pytorch_model.bin), or ``(None, tensors)`` of a single weights file."""
    path = Path(path)
    if not path.is_dir():
        return None, read_state_dict(path)
    if not (path / "config.json").is_file():
        raise WeightsError(f"{path} has no config.json (a BertForMaskedLM folder, as "
                           f"save_pretrained writes it)")
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise WeightsError(f"{path}/config.json cannot be read as JSON ({exc})") from None
    found = [path / f for f in WEIGHT_FILES if (path / f).is_file()]
    if not found:
        sharded = [f.name for f in path.glob("*.index.json")]
        raise WeightsError(f"{path} has no {' or '.join(WEIGHT_FILES)}" + (
            f" ({sharded[0]}: a sharded checkpoint; save it with a larger max_shard_size)"
            if sharded else ""))
    return config, read_state_dict(found[0])


def _check_config(config: dict, shape: BertShape) -> None:
    """What the tensors' shapes do not show: the kind of model, the number of heads, the
    activation, the position embeddings, the LayerNorm epsilon."""
    def differs(key: str, ours, default=None) -> None:
        theirs = config.get(key, default)
        if theirs != ours:
            raise WeightsError(f"config.json has {key} {theirs!r}; the net has {ours!r}")

    differs("model_type", "bert")
    if config.get("is_decoder"):
        raise WeightsError("config.json has is_decoder true; a BERT encoder is needed")
    differs("num_attention_heads", shape.heads)
    differs("hidden_act", "gelu")
    differs("position_embedding_type", "absolute", "absolute")
    differs("layer_norm_eps", shape.layer_norm_eps, 1e-12)
    if config.get("tie_word_embeddings", True) is False:
        raise WeightsError("config.json has tie_word_embeddings false; our masked-LM decoder "
                           "is the word embeddings")


def load_hf_bert(model: Bert, path: Path) -> None:
    """Load a Hugging Face BERT (a ``save_pretrained`` folder of a BertForMaskedLM, or one
    weights file in HF's or our names) into ``model``.

    Checked before anything is copied: that an HF model can have the net's shape at all
    (heads × head_dim = hidden), then config.json against the net, then tensor by tensor in
    forward order the first whose shape differs, the first missing, the first the net does not
    have; each a WeightsError naming the key (and both shapes).
    """
    s = model.shape
    if s.attention_width != s.hidden:
        raise WeightsError(
            f"a Hugging Face BERT has heads × head_dim = hidden, but this net has {s.heads} × "
            f"{s.head_dim} = {s.attention_width} against hidden {s.hidden} (a wide twin's heads "
            f"are model.head_dim × widen.attention_mult wide: an HF model fills one only when "
            f"widen.attention_mult equals widen.boundary_mult)")
    config, tensors = read_hf_bert(path)
    if config is not None:
        _check_config(config, s)
    mapped: dict[str, tuple[str, torch.Tensor]] = {}
    for name, value in tensors.items():
        try:
            ours = our_name(name)
        except KeyError:
            raise WeightsError(f"{name} is not a tensor of a BertForMaskedLM (in Hugging "
                               f"Face's or our names)") from None
        if ours is None:
            continue
        if ours in mapped:
            raise WeightsError(f"{name} and {mapped[ours][0]} both name our {ours}")
        mapped[ours] = (name, value)
    decoder = tensors.get(DECODER)
    words = mapped.get("embeddings.word_embeddings.weight", (None, None))[1]
    if decoder is not None and words is not None and not torch.equal(decoder, words):
        raise WeightsError(f"{DECODER} differs from the word embeddings; our masked-LM decoder "
                           f"is tied to them")
    load_mapped(model, mapped, outside_name=hf_name,
                unknown=f"this BERT (layers 0..{s.layers - 1})")
