"""The ``model`` section of a BERT run (``model.family: bert``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Literal

from ...config import Config, ConfigError, ModelConfig, WideningConfig, _positive


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
    DATASETS: ClassVar[tuple[str, ...]] = ("text",)
    widen: BertWidening = field(default_factory=BertWidening)
    hidden: int = 768
    layers: int = 12
    heads: int = 12
    head_dim: int = 64
    ffn: int = 3072
    vocab_size: int = 30522
    max_len: int = 512
    dropout: float = 0.1

    def check(self, cfg: Config) -> None:
        for key in ("hidden", "layers", "heads", "head_dim", "ffn", "max_len"):
            _positive(f"model.{key}", getattr(self, key))
        for key in ("attention_mult", "ffn_mult"):
            _positive(f"model.widen.{key}", getattr(self.widen, key))
        if self.vocab_size < 8:
            raise ConfigError(f"model.vocab_size: must be at least 8, got {self.vocab_size}")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"model.dropout: must be in [0, 1), got {self.dropout}")
        if cfg.compare.deeper_layers < 0:
            raise ConfigError(f"compare.deeper_layers: must be >= 0, got "
                              f"{cfg.compare.deeper_layers}")
        _positive("imitate.attention_weight", cfg.imitate.attention_weight, allow_zero=True)
        if cfg.imitate.point_site != "output":
            raise ConfigError("imitate.point_site: preact is for ResNet blocks; a BERT's points "
                              "are its layer outputs")


ModelConfig.register("bert", BertModelConfig)
