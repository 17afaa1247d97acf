"""``gwtn export`` for a BERT: a Hugging Face BertForMaskedLM folder (and its tokenizer).

Nothing here imports ``transformers``: the files are written from our own parameter names
through ``names.py``, the table ``wide.init`` reads them back with.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ... import checkpoint
from ...export_hf import ExportError
from ..weights import WeightsError
from .names import hf_config, hf_state_dict
from .net import Bert


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
    try:  # the names both ways live in names.py (wide.init reads them back)
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
