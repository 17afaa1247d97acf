"""What a model family's task decides for the stages: batches on the device, scored outputs,
evaluation metrics, and the features that imitation compares.

Each family's ``Family.task`` gives its task (an ``ImageTask`` in ``models/resnet/task.py`` for
classification, a ``TextTask`` in ``models/bert/task.py`` for masked-LM), a ``ScoredTask``,
made once per run by ``spec.resolve``. The stages are written once against this interface:

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
  parallel imitation schedule feeds each segment the teacher's output below it);
- ``imitation_outputs`` / ``first_segment`` / ``maps_loss``: the teacher's and the thin net's
  outputs at a point, with the family's own extra term where it has one (a BERT's attention
  maps under ``imitate.attention_weight``).
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F

from ..config import Config
from ..data.datasets import rank_eval_batches


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The batch's accuracy as a 0-d tensor on the logits' device: no host sync here (the
    loop fetches it with the loss, in one transfer)."""
    return (logits.detach().argmax(1) == labels).float().mean()


class ScoredTask:
    """What every family's task evaluates the same way: this rank's share of the held-out
    split, and [correct, scored items, summed cross-entropy] of a batch's scored outputs."""

    # The channel axis of an imitation point's output: (b, T, D) for text; an image task
    # says 1, for (B, C, H, W). ``imitate.channel_reduction: sum`` sums the MSE over it.
    channel_dim = -1
    # Decimals reports give a metric (4 unless named here: a perplexity takes 2).
    digits: ClassVar[dict[str, int]] = {}

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

    def imitation_outputs(self, wide, thin, x, end: int, bridges, bridged: dict[int, str],
                          site: dict, maps: bool) -> tuple[torch.Tensor, torch.Tensor, None]:
        """The teacher's output at block ``end`` (no grad), the thin net's (through the pairs
        already passed; ``site``: where a point is read, e.g. ``{"preact": True}``), and the
        family's extra imitation term (None: a task without one refuses ``maps``)."""
        if maps:
            raise ValueError(f"{type(self).__name__} has no attention maps to imitate")
        target = wide(x, upto=end, **site)  # no grad
        return target, self.features(thin, x, end, bridges, bridged, **site), None

    def first_segment(self, thin, x, end: int, maps: bool):
        """The parallel schedule's bottom segment: block ``end``'s output on the batch itself
        (with ``maps``, the family's (output, maps) pair)."""
        if maps:
            raise ValueError(f"{type(self).__name__} has no attention maps to imitate")
        return self.features(thin, x, end, None, {})

    def maps_loss(self, wide_maps, thin_maps, mask) -> torch.Tensor:
        """The family's extra imitation term between the two nets' maps at a point."""
        raise ValueError(f"{type(self).__name__} has no attention maps to imitate")

    def is_score(self, key: str) -> bool:
        """Whether a stage record's ``key`` is one of this task's scores (reports show a warm
        start's scores beside the finished net's)."""
        return key.endswith("_accuracy")

    def tokens(self, x) -> torch.Tensor | None:
        """The batch's real (unpadded) tokens as a 0-d device tensor, for the tokens/s of the
        step metrics; None for tasks whose inputs are not token sequences."""
        return None

    def eval_sums(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """(N, classes) logits and (N,) targets → [correct, N, summed cross-entropy], float64."""
        return torch.tensor([(logits.argmax(1) == y).sum().item(), len(y),
                             F.cross_entropy(logits, y, reduction="sum").item()],
                            dtype=torch.float64)
