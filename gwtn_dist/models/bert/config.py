"""The ``model`` section of a BERT run (``model.family: bert``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from ...config import ModelConfig, WideningConfig


@dataclass
class BertWidening(WideningConfig):
    """A BERT twin. The paper does not say how it widened BERT; inner widening at the same
    hidden size is MobileBERT's choice, so ``boundary_mult`` (the hidden size) defaults to 1 and
    a twin with a wider hidden size gets lifts only. attention_mult multiplies each head's width,
    so the attention inner width heads × head_dim grows while the number of heads stays and
    attention maps correspond head by head (default 4); ffn_mult multiplies the feed-forward
    width (default 4)."""

    attention_mult: int = 4
    ffn_mult: int = 4


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
    widen: BertWidening = field(default_factory=BertWidening)
    hidden: int = 768
    layers: int = 12
    heads: int = 12
    head_dim: int = 64
    ffn: int = 3072
    vocab_size: int = 30522
    max_len: int = 512
    dropout: float = 0.1
