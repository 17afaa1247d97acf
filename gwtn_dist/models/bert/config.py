"""The ``model`` section of a BERT run (``model.family: bert``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from ...config import ModelConfig, WideningConfig


@dataclass
class BertModelConfig(ModelConfig):
    """The thin BERT (trained on ``data.dataset: text``); the wide twin follows from ``widen``
    (``attention_mult``, ``ffn_mult``, ``boundary_mult``).

    Hidden size ``hidden`` (768), ``layers`` (12), ``heads`` (12) of width ``head_dim`` (64),
    feed-forward width ``ffn`` (3072), ``vocab_size`` (30522; at least the token shards'
    vocabulary), ``max_len`` positions (512), ``dropout`` (0.1) — BERT_BASE's values. Every
    layer output is an imitation point. heads × head_dim must equal hidden for the thin net to
    load in Hugging Face's BertModel.
    """

    family: Literal["bert"] = "bert"
    widen: WideningConfig = field(default_factory=WideningConfig)
    hidden: int = 768
    layers: int = 12
    heads: int = 12
    head_dim: int = 64
    ffn: int = 3072
    vocab_size: int = 30522
    max_len: int = 512
    dropout: float = 0.1
