"""BERT encoders built as a thin net and its widened twin, with Hugging Face's parameter layout.

Post-LN Transformer layers (self-attention through ``scaled_dot_product_attention`` with a
padding mask, GELU feed-forward), BERT's embeddings (word + position + token type, LayerNorm)
and its masked-LM head (dense → GELU → LayerNorm → decoder tied to the word embeddings + bias).
The wide twin keeps the hidden size and the number of heads and widens what is inside a layer:
each head's width (``head_dim``, so the attention inner width heads × head_dim grows and the
output projection maps it back to the hidden size) and the feed-forward width. Layer outputs of
the two nets are then (B, T, hidden) both, so they match one to one without linear pairs, and
their attention maps (B, heads, T, T) match head by head.

The blocks, in forward order, are ``embeddings`` and ``layer.0`` … ``layer.{L-1}``; the
imitation points are the outputs of every layer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

Batch = dict[str, torch.Tensor]  # {"input_ids", "attention_mask"}: int64 (B, T)


@dataclass(frozen=True)
class BertShape:
    """Everything that fixes a BERT's tensor shapes (and its dropout).

    The attention inner width is ``heads × head_dim``; Hugging Face's ``BertModel`` requires it
    to equal ``hidden``, which the thin net of an exportable config satisfies.
    """

    vocab_size: int
    hidden: int
    layers: int
    heads: int
    head_dim: int
    ffn: int
    max_len: int
    type_vocab_size: int = 2
    dropout: float = 0.1
    layer_norm_eps: float = 1e-12
    family: ClassVar[str] = "bert"  # finds the family of a shape (models.family.family_for)

    @property
    def attention_width(self) -> int:
        return self.heads * self.head_dim


class Embeddings(nn.Module):
    """word + position + token-type (always type 0 here) embeddings, then LayerNorm."""

    def __init__(self, s: BertShape):
        super().__init__()
        self.word_embeddings = nn.Embedding(s.vocab_size, s.hidden, padding_idx=0)
        self.position_embeddings = nn.Embedding(s.max_len, s.hidden)
        self.token_type_embeddings = nn.Embedding(s.type_vocab_size, s.hidden)
        self.LayerNorm = nn.LayerNorm(s.hidden, eps=s.layer_norm_eps)
        self.dropout = nn.Dropout(s.dropout)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:  # (B, T) → (B, T, D)
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        h = (self.word_embeddings(input_ids) + self.position_embeddings(positions)
             + self.token_type_embeddings.weight[0])
        return self.dropout(self.LayerNorm(h))


class SelfAttention(nn.Module):
    """Multi-head self-attention: D → heads × head_dim (q, k, v) → D (``output``)."""

    def __init__(self, s: BertShape):
        super().__init__()
        self.heads, self.head_dim, self.p = s.heads, s.head_dim, s.dropout
        self.query = nn.Linear(s.hidden, s.attention_width)
        self.key = nn.Linear(s.hidden, s.attention_width)
        self.value = nn.Linear(s.hidden, s.attention_width)
        self.output = nn.Linear(s.attention_width, s.hidden)

    def _split(self, t: torch.Tensor) -> torch.Tensor:  # (B, T, H·d) → (B, H, T, d)
        b, n, _ = t.shape
        return t.view(b, n, self.heads, self.head_dim).transpose(1, 2)

    def forward(self, h: torch.Tensor, bias: torch.Tensor, need_probs: bool = False
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """h (B, T, D), bias (B, 1, 1, T) additive key mask → (B, T, D) and, with
        ``need_probs``, the attention probabilities (B, H, T, T)."""
        q, k, v = self._split(self.query(h)), self._split(self.key(h)), self._split(self.value(h))
        p = self.p if self.training else 0.0
        probs = None
        if need_probs:  # SDPA does not return its probabilities: compute them where asked
            scores = q @ k.transpose(-1, -2) / math.sqrt(self.head_dim) + bias
            probs = scores.softmax(-1)
            ctx = F.dropout(probs, p, self.training) @ v
        else:
            ctx = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=p)
        b, _, n, _ = ctx.shape
        return self.output(ctx.transpose(1, 2).reshape(b, n, -1)), probs


class Layer(nn.Module):
    """Post-LN Transformer layer: h ← LN(h + attn(h)); h ← LN(h + W_out gelu(W_in h))."""

    def __init__(self, s: BertShape):
        super().__init__()
        self.attention = SelfAttention(s)
        self.attention_norm = nn.LayerNorm(s.hidden, eps=s.layer_norm_eps)
        self.intermediate = nn.Linear(s.hidden, s.ffn)
        self.output = nn.Linear(s.ffn, s.hidden)
        self.output_norm = nn.LayerNorm(s.hidden, eps=s.layer_norm_eps)
        self.dropout = nn.Dropout(s.dropout)

    def forward(self, h: torch.Tensor, bias: torch.Tensor, need_probs: bool = False
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        a, probs = self.attention(h, bias, need_probs)
        h = self.attention_norm(h + self.dropout(a))
        f = self.output(F.gelu(self.intermediate(h)))
        return self.output_norm(h + self.dropout(f)), probs


class MLMHead(nn.Module):
    """dense → GELU → LayerNorm → decoder (the word embeddings, passed in) + bias."""

    def __init__(self, s: BertShape):
        super().__init__()
        self.dense = nn.Linear(s.hidden, s.hidden)
        self.LayerNorm = nn.LayerNorm(s.hidden, eps=s.layer_norm_eps)
        self.bias = nn.Parameter(torch.zeros(s.vocab_size))

    def forward(self, h: torch.Tensor, decoder: torch.Tensor) -> torch.Tensor:
        """h (..., D), decoder (V, D) → logits (..., V)."""
        return F.linear(self.LayerNorm(F.gelu(self.dense(h))), decoder, self.bias)


def attention_bias(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """attention_mask (B, T), 1 = token, 0 = padding → additive bias (B, 1, 1, T).

    The most negative finite value rather than −inf: padded keys get probability exactly 0
    while log-probabilities stay finite (the attention-map KL needs them).
    """
    return ((1 - mask[:, None, None, :].to(dtype)) * torch.finfo(dtype).min).contiguous()


class Bert(nn.Module):
    """A BERT for masked-LM whose blocks can be run one at a time.

    ``forward(x)`` with x = {"input_ids", "attention_mask"} (B, T) gives logits (B, T, V);
    ``select`` (bool (B, T)) keeps only those positions' logits (N, V), so the decoder runs
    where a loss is taken. ``upto=k`` returns block k's output (B, T, D) instead (0 = the
    embeddings, i + 1 = layer i) and ``attention=True`` with it also layer k's attention
    probabilities (B, H, T, T).
    """

    family = "bert"  # finds the family of a net (models.family.family_for)

    def __init__(self, shape: BertShape):
        super().__init__()
        self.shape = shape
        self.embeddings = Embeddings(shape)
        self.layer = nn.ModuleList(Layer(shape) for _ in range(shape.layers))
        self.mlm = MLMHead(shape)
        self._init_weights()

    def _init_weights(self) -> None:
        # BERT's init: N(0, 0.02) weights, zero biases, LayerNorm at identity.
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.02)
            if isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        with torch.no_grad():
            self.embeddings.word_embeddings.weight[0].zero_()  # [PAD]

    def blocks(self) -> list[tuple[str, nn.Module]]:
        """The blocks in forward order: ``embeddings``, then ``layer.I``."""
        return [("embeddings", self.embeddings),
                *((f"layer.{i}", layer) for i, layer in enumerate(self.layer))]

    def head(self, h: torch.Tensor) -> torch.Tensor:
        """Last layer's output (..., D) → masked-LM logits (..., V)."""
        return self.mlm(h, self.embeddings.word_embeddings.weight)

    def forward(self, x: Batch, upto: int | None = None, select: torch.Tensor | None = None,
                attention: bool = False, points: list[int] | None = None):
        if points is not None:
            return self._outputs_at(x, points, attention)
        h = self.embeddings(x["input_ids"])  # (B, T, D)
        if upto == 0:
            return h
        bias = attention_bias(x["attention_mask"], h.dtype)
        for i, layer in enumerate(self.layer):
            last = upto == i + 1
            h, probs = layer(h, bias, need_probs=attention and last)
            if last:
                return (h, probs) if attention else h
        return self.head(h if select is None else h[select])

    def _outputs_at(self, x: Batch, points: list[int], attention: bool):
        """The outputs (B, T, D) of blocks ``points`` (ascending) from one pass, as a tuple;
        with ``attention``, (that tuple, the tuple of those layers' attention maps
        (B, H, T, T))."""
        h = self.embeddings(x["input_ids"])
        outs, maps = ([h], [None]) if 0 in points else ([], [])
        bias = attention_bias(x["attention_mask"], h.dtype)
        for i, layer in enumerate(self.layer[: points[-1]]):
            h, probs = layer(h, bias, need_probs=attention and i + 1 in points)
            if i + 1 in points:
                outs.append(h)
                maps.append(probs)
        return (tuple(outs), tuple(maps)) if attention else tuple(outs)

    def run_blocks(self, h: torch.Tensor, start: int, end: int, mask: torch.Tensor,
                   attention: bool = False):
        """Blocks ``start``..``end`` (layers start−1..end−1; start ≥ 1) on h (B, T, D), block
        ``start``'s input, with attention mask (B, T); returns block ``end``'s output, and
        with ``attention`` also its attention maps (B, H, T, T)."""
        if start < 1:
            raise ValueError("run_blocks starts at a layer (block 1 or later), not the embeddings")
        bias = attention_bias(mask, h.dtype)
        probs = None
        for i in range(start, end + 1):
            h, probs = self.layer[i - 1](h, bias, need_probs=attention and i == end)
        return (h, probs) if attention else h


def imitation_points(model: Bert) -> list[str]:
    """Every layer output, bottom to top (``layer.0`` …)."""
    return [name for name, _ in model.blocks()[1:]]
