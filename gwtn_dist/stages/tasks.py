"""What a model family's task decides for the stages: batches on the device, scored outputs,
evaluation metrics, and the features that imitation compares.

``task_for(cfg)`` gives the task of ``cfg``'s model family (its ``Family.task``: an
``ImageTask`` in ``models/resnet/task.py`` for classification, a ``TextTask`` in
``models/bert/task.py`` for masked-LM), a ``ScoredTask``. The stages are written once against
this interface:

- ``prepare(x, y, device, dtype)``: a loaded batch moved to the device (images cast to the
  net's dtype and memory format);
- ``scored(model, x, y)`` → (logits (N, classes), targets (N,)): where the task loss is taken
  (every image; the masked tokens of a text batch), also used for logit distillation;
- ``eval_sums`` / ``eval_metrics``: counts summed over batches and ranks, then the metrics;
  ``metric`` names the headline one that reports give (higher is better), ``select_metric``
  the one that choices are made on (the validation split's), ``curve_split`` the split that
  ``eval_every`` curves read, ``score_splits`` the splits a finished stage is scored on,
  ``secondary`` other metrics that comparisons report, ``labels`` the words reports use for
  metric names where the task decides them, and ``separate_test`` whether the report reads a split
  apart from the one choices read;
- ``features(model, x, end, …)``, ``feature_mask(x)``, ``normalize(t)``: the output of block
  ``end`` that imitation compares, which positions count, and layer-normalised targets;
  ``segment(model, x, start, end, h)``: blocks ``start``..``end`` run on a given input h (the
  parallel imitation schedule feeds each segment the teacher's output below it).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..config import Config
from ..data.batches import rank_eval_batches
from ..models.family import family_for
from .losses import accuracy


class ScoredTask:
    """What every family's task evaluates the same way: this rank's share of the held-out
    split, and [correct, scored items, summed cross-entropy] of a batch's scored outputs."""

    # The channel axis of an imitation point's output: (b, T, D) for text; an image task
    # says 1, for (B, C, H, W). ``imitate.channel_reduction: sum`` sums the MSE over it.
    channel_dim = -1

    def __init__(self, cfg: Config):
        self.cfg = cfg

    def eval_batches(self, limit: int, rank: int, world: int, split: str = "test"):
        """Rank ``rank`` of ``world``'s share of the held-out ``split``, model-ready (its first
        ``limit`` samples over all ranks; 0 = all)."""
        return rank_eval_batches(self.cfg, limit, rank, world, split)

    def label_loss(self, model, x, y) -> tuple[torch.Tensor, dict]:
        """Cross-entropy of ``model``'s scored outputs against the labels, and the batch's
        training accuracy (the loss of the wide stage, fine-tuning and the baselines)."""
        logits, targets = self.scored(model, x, y)  # (N, classes), (N,)
        return F.cross_entropy(logits, targets), {"train_accuracy": accuracy(logits, targets)}

    def tokens(self, x) -> torch.Tensor | None:
        """The batch's real (unpadded) tokens as a 0-d device tensor, for the tokens/s of the
        step metrics; None for tasks whose inputs are not token sequences."""
        return None

    def eval_sums(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """(N, classes) logits and (N,) targets → [correct, N, summed cross-entropy], float64."""
        return torch.tensor([(logits.argmax(1) == y).sum().item(), len(y),
                             F.cross_entropy(logits, y, reduction="sum").item()],
                            dtype=torch.float64)


def attention_kl(wide: torch.Tensor, thin: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """KL(wide ‖ thin) of attention probabilities (B, H, T, T), summed over keys, averaged over
    heads and unpadded query positions (mask (B, T)). Padded keys have probability exactly 0 in
    both nets (see ``models.bert.net.attention_bias``), so they add nothing. Computed in
    float32 whatever the maps' dtype (the teacher's come in the compute dtype)."""
    wide, thin = wide.float(), thin.float()
    eps = torch.finfo(thin.dtype).tiny
    per_query = (wide * (wide.clamp_min(eps).log() - thin.clamp_min(eps).log())).sum(-1)
    per_query = per_query.mean(1)  # (B, T): the average over heads
    return (per_query * mask).sum() / mask.sum().clamp_min(1)


def task_for(cfg: Config) -> ScoredTask:
    """The task of ``cfg``'s model family."""
    return family_for(cfg.model).task(cfg)
