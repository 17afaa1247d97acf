"""The BERT ``Family``: what the stages need from BERT encoders (registered as ``bert``)."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from ...config import Config
from ..bridge import Bridges
from ..family import register_family
from .config import BertModelConfig
from .names import load_hf_bert
from .net import Bert, BertShape, imitation_points

log = logging.getLogger("gwtn")


def bert_shape(m: BertModelConfig, wide: bool, layers: int | None = None) -> BertShape:
    """The thin BERT or its twin (each head and the feed-forward widened; the hidden size kept
    unless ``widen.boundary_mult`` > 1)."""
    w = m.widen
    hidden = m.hidden * (w.boundary_mult if wide else 1)
    return BertShape(vocab_size=m.vocab_size, hidden=hidden, layers=layers or m.layers,
                     heads=m.heads, head_dim=m.head_dim * (w.attention_mult if wide else 1),
                     ffn=m.ffn * (w.ffn_mult if wide else 1), max_len=m.max_len,
                     dropout=m.dropout)


class BertFamily:
    """BERT encoders on token shards: every layer output is an imitation point, and a twin
    with a wider hidden size gets lifts only (nothing to merge; see ``models/bridge.py``)."""

    name = "bert"
    config_class = BertModelConfig
    depth_label = "layers"
    docs = "docs/bert.md"
    lift_only = True
    takes_images = False

    def shape(self, m: BertModelConfig, wide: bool, depth: int | None = None) -> BertShape:
        return bert_shape(m, wide, depth)

    def shape_from_meta(self, fields: dict) -> BertShape:
        return BertShape(**fields)

    def build(self, shape: BertShape) -> Bert:
        return Bert(shape)

    def thin_depth(self, m: BertModelConfig) -> int:
        return m.layers

    def deeper_depth(self, cfg: Config) -> int:
        """``compare.deeper_layers``; 0 means twice the thin net's layers."""
        return cfg.compare.deeper_layers or 2 * cfg.model.layers

    def imitation_points(self, model: Bert, m: BertModelConfig) -> list[str]:
        return imitation_points(model)

    def point_index(self, model: Bert, point: str) -> int:
        names = [name for name, _ in model.blocks()]
        if point not in names:
            raise KeyError(f"no block named {point!r}; blocks are {names}")
        return names.index(point)

    def boundary_width(self, model: Bert, point: str) -> int:
        return model.shape.hidden  # every BERT point is a layer output (B, T, hidden)

    def merge_pairs(self, thin: Bert, bridges: Bridges, skip: list[str]) -> None:
        raise ValueError("BERT pairs are lifts only: Q P = I, there is nothing to merge")

    def task(self, cfg: Config):
        from .task import TextTask  # the task imports the stages' shared task code

        return TextTask(cfg)

    @torch.no_grad()
    def init_head(self, cfg: Config, thin: Bert, wide: nn.Module, bridges: Bridges | None,
                  last_point: str) -> str:
        """Give a thin BERT the wide net's masked-LM head (transform and output bias).

        With the same hidden size the thin layer outputs imitated the wide ones, so the wide
        head reads them directly; its decoder is tied to the word embeddings, which stay the
        thin net's own. A wider twin's head (dense D' × D', LayerNorm over D') cannot read
        D-wide outputs, so the thin head stays its own there.
        """
        if cfg.imitate.init_head != "wide":
            return "random"
        if cfg.model.widen.boundary_mult != 1:
            log.info("imitate.init_head=wide: the wide twin's hidden size differs, so the thin "
                     "masked-LM head keeps its own initialisation")
            return "random"
        thin.mlm.load_state_dict(wide.state_of("mlm"))
        return "wide"

    def load_weights(self, model: Bert, path: Path) -> None:
        """A Hugging Face BertForMaskedLM folder, or a weights file in HF's or our names."""
        load_hf_bert(model, Path(path))

    def synthetic_batch(self, cfg: Config, batch_size: int,
                        generator: torch.Generator) -> tuple[dict, torch.Tensor]:
        # input_ids, attention_mask: (B, T) int64; labels: (B, T), -100 where no loss is taken
        m = cfg.model
        ids = torch.randint(5, m.vocab_size, (batch_size, m.max_len), generator=generator)
        masked = torch.rand(batch_size, m.max_len, generator=generator) < 0.15
        labels = torch.where(masked, ids, torch.full_like(ids, -100))
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, labels

    def export(self, model: Bert, out: Path, tokenizer: Path | None) -> list[Path]:
        from .export import export_model  # it imports export_hf, which finds it through here

        return export_model(model, out, tokenizer)


register_family(BertFamily.name, BertFamily())
