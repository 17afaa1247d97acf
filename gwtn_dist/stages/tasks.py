"""What a model family's task decides for the stages: batches on the device, scored outputs,
evaluation metrics, and the features that imitation compares.

``task_for(cfg)`` gives an ``ImageTask`` (ResNet, classification) or a ``TextTask`` (BERT,
masked-LM). The stages are written once against this interface:

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

import logging
import math
from typing import ClassVar

import torch
import torch.nn.functional as F

from ..config import Config
from ..data.batches import rank_eval_batches, token_split_samples
from ..data.mlm import IGNORE
from ..models.bridge import Bridges
from .losses import accuracy

log = logging.getLogger("gwtn")
_warned_one_split: set[str] = set()  # shard folders already warned about (once per process)


def run_prefix(model, x: torch.Tensor, last: int, bridges: Bridges | None = None,
               bridged: dict[int, str] | None = None) -> torch.Tensor:
    """Run blocks 0..last of a ResNet on x (B, C_in, H, W); returns block ``last``'s output.

    ``bridged`` maps a block index to the point whose pair (Q P) follows that block.
    """
    for i, (_, block) in enumerate(model.blocks()[: last + 1]):
        x = block(x)
        if bridges is not None and bridged and i in bridged and i != last:
            x = bridges.pair(bridged[i])(x)
    return x


class _ScoredTask:
    """What both tasks evaluate the same way: this rank's share of the held-out split, and
    [correct, scored items, summed cross-entropy] of a batch's scored outputs."""

    def __init__(self, cfg: Config):
        self.cfg = cfg

    def eval_batches(self, limit: int, rank: int | None = None, split: str = "test"):
        return rank_eval_batches(self.cfg, limit, rank=rank, split=split)

    def label_loss(self, model, x, y) -> tuple[torch.Tensor, dict]:
        """Cross-entropy of ``model``'s scored outputs against the labels, and the batch's
        training accuracy (the loss of the wide stage, fine-tuning and the baselines)."""
        logits, targets = self.scored(model, x, y)  # (N, classes), (N,)
        return F.cross_entropy(logits, targets), {"train_accuracy": accuracy(logits, targets)}

    def eval_sums(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """(N, classes) logits and (N,) targets → [correct, N, summed cross-entropy], float64."""
        return torch.tensor([(logits.argmax(1) == y).sum().item(), len(y),
                             F.cross_entropy(logits, y, reduction="sum").item()],
                            dtype=torch.float64)


class ImageTask(_ScoredTask):
    """Image classification with a ResNet: test accuracy and cross-entropy."""

    metric = "test_accuracy"
    metric_label = "test accuracy"
    secondary: tuple[str, ...] = ()
    labels: ClassVar[dict[str, str]] = {}  # report.METRIC_LABELS names every metric
    validation: str | None = None  # compare.md describes the split from data.val_samples

    def __init__(self, cfg: Config):
        super().__init__(cfg)
        self.memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
        has_val = cfg.data.dataset == "fashion-mnist" and cfg.data.val_samples > 0
        self.curve_split = "val" if has_val else "test"
        self.separate_test = has_val
        self.select_metric = f"{self.curve_split}_accuracy"
        # A tuning run (eval_test false) never reads the test split.
        self.score_splits = (("val",) if has_val else ()) + (("test",) if cfg.eval_test else ())

    def prepare(self, x: torch.Tensor, y: torch.Tensor, device: torch.device,
                dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(b, C, H, W), (b,) → on the device, (b, C, H, W) in the run's memory format.

        A pinned batch (the prefetcher's, for a GPU) is copied asynchronously."""
        x = x.to(device, dtype=dtype, non_blocking=True).contiguous(
            memory_format=self.memory_format)
        return x, y.to(device, non_blocking=True)

    def scored(self, model, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return model(x).float(), y  # (b, classes), (b,); fp32 losses for bf16 nets

    def eval_metrics(self, sums: list[float], split: str = "test") -> dict:
        correct, total, loss_sum = sums
        return {f"{split}_accuracy": correct / max(total, 1),
                f"{split}_loss": loss_sum / max(total, 1), f"{split}_samples": int(total)}

    def features(self, model, x: torch.Tensor, end: int, bridges: Bridges | None,
                 bridged: dict[int, str]) -> torch.Tensor:
        """Block ``end``'s output (b, c, H', W'), through the pairs already passed."""
        return run_prefix(model, x, end, bridges, bridged).float()

    def segment(self, model, x: torch.Tensor, start: int, end: int, h: torch.Tensor,
                attention: bool = False) -> torch.Tensor:
        """Blocks ``start``..``end`` run on h (b, c, H, W), block ``start``'s input (the
        parallel imitation schedule's teacher-fed segment); block ``end``'s output in float32."""
        return model.run_blocks(h, start, end).float()

    def feature_mask(self, x: torch.Tensor) -> None:
        return None  # every position of an image counts

    def normalize(self, t: torch.Tensor) -> torch.Tensor:
        """Normalise (B, C, H, W) over C at each position, no affine (MobileBERT-style)."""
        return F.layer_norm(t.permute(0, 2, 3, 1), t.shape[1:2]).permute(0, 3, 1, 2)


class TextTask(_ScoredTask):
    """Masked-LM with a BERT: accuracy and perplexity over the masked tokens of the held-out
    documents.

    Token shards with a ``test`` split (``gwtn shards … --test-every``): curves and choices read
    ``val`` (metrics ``val_mlm_accuracy``, ``val_perplexity``, …), reports read ``test`` under
    the headline names (``mlm_accuracy``, ``perplexity``, ``mlm_loss``, ``eval_tokens``); a
    tuning run (``eval_test`` false) never reads ``test``. Shards without one (written before
    ``--test-every``) have one held-out split, ``val``, read for curves, choices and reports
    alike under the headline names, as before; a warning says so once.
    """

    metric = "mlm_accuracy"
    secondary = ("perplexity",)

    def __init__(self, cfg: Config):
        super().__init__(cfg)
        counts = token_split_samples(cfg.data.shards) if cfg.data.dataset == "text" else {}
        self.separate_test = bool(counts.get("test"))
        if self.separate_test:
            self.curve_split, self.select_metric = "val", "val_mlm_accuracy"
            self.score_splits = ("val", "test") if cfg.eval_test else ("val",)
            self.metric_label = "test MLM accuracy"
            self.validation = "the token shards' val documents (whole documents, never trained on)"
            self.labels = {"mlm_accuracy": self.metric_label, "perplexity": "test perplexity",
                           "val_mlm_accuracy": "val MLM accuracy",
                           "val_perplexity": "val perplexity"}
        else:
            # "test" here reads the one held-out split (val): see rank_eval_batches.
            self.curve_split, self.select_metric = "test", "mlm_accuracy"
            self.score_splits = ("test",)
            self.metric_label = "held-out MLM accuracy"
            self.validation = None
            self.labels = {"mlm_accuracy": self.metric_label}
            if counts and str(cfg.data.shards) not in _warned_one_split:
                _warned_one_split.add(str(cfg.data.shards))
                log.warning(
                    "%s: the token shards hold no test split, so the choices (curves, tuning) "
                    "and the report read the same held-out split (val); rewrite them with "
                    "`gwtn shards text|wikipedia … --test-every 100` for a separate test split",
                    cfg.data.shards)

    def prepare(self, x: dict[str, torch.Tensor], y: torch.Tensor, device: torch.device,
                dtype: torch.dtype | None = None) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Token ids, attention mask and labels (b, T) to the device (integers stay integers)."""
        return {k: v.to(device, non_blocking=True) for k, v in x.items()}, \
            y.to(device, non_blocking=True)  # asynchronous from pinned memory

    def scored(self, model, x: dict[str, torch.Tensor], y: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits (N, V) and original ids (N,) of the N masked tokens (the decoder runs there
        only)."""
        chosen = y != IGNORE  # (b, T)
        return model(x, select=chosen).float(), y[chosen]

    def eval_metrics(self, sums: list[float], split: str = "test") -> dict:
        """[correct, masked tokens, summed cross-entropy] → the metrics, named ``val_…`` for
        the validation split when a test split exists, else under the headline names."""
        correct, tokens, loss_sum = sums
        loss = loss_sum / max(tokens, 1)
        prefix = "val_" if self.separate_test and split == "val" else ""
        scores = {"mlm_accuracy": correct / max(tokens, 1), "mlm_loss": loss,
                  "perplexity": math.exp(min(loss, 700.0)), "eval_tokens": int(tokens)}
        return {prefix + k: v for k, v in scores.items()}

    def features(self, model, x: dict[str, torch.Tensor], end: int, bridges: Bridges | None,
                 bridged: dict[int, str]) -> torch.Tensor:
        """Block ``end``'s output (b, T, D) (BERT pairs are lifts only: nothing is inserted
        between layers)."""
        return model(x, upto=end).float()

    def segment(self, model, x: dict[str, torch.Tensor], start: int, end: int, h: torch.Tensor,
                attention: bool = False):
        """Layers ``start``..``end`` (block indices, ≥ 1) run on h (b, T, D), block ``start``'s
        input, under x's attention mask; block ``end``'s output in float32, and with
        ``attention`` also its attention maps (b, H, T, T)."""
        out = model.run_blocks(h, start, end, x["attention_mask"], attention=attention)
        return tuple(t.float() for t in out) if attention else out.float()

    def feature_mask(self, x: dict[str, torch.Tensor]) -> torch.Tensor:
        return x["attention_mask"].bool()  # (b, T): padded positions are left out of the loss

    def normalize(self, t: torch.Tensor) -> torch.Tensor:
        """Normalise (B, T, D) over D, no affine (MobileBERT's layer-normalised targets)."""
        return F.layer_norm(t, t.shape[-1:])


def attention_kl(wide: torch.Tensor, thin: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """KL(wide ‖ thin) of attention probabilities (B, H, T, T), summed over keys, averaged over
    heads and unpadded query positions (mask (B, T)). Padded keys have probability exactly 0 in
    both nets (see ``models.bert.attention_bias``), so they add nothing."""
    eps = torch.finfo(thin.dtype).tiny
    per_query = (wide * (wide.clamp_min(eps).log() - thin.clamp_min(eps).log())).sum(-1)
    per_query = per_query.mean(1)  # (B, T): the average over heads
    return (per_query * mask).sum() / mask.sum().clamp_min(1)


def task_for(cfg: Config) -> ImageTask | TextTask:
    """The task of ``cfg``'s model family."""
    return TextTask(cfg) if cfg.model.family == "bert" else ImageTask(cfg)
