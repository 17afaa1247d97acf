"""The BERT family's task: masked-LM (accuracy and perplexity over the masked tokens of the
held-out documents), and the layer outputs (B, T, D) that imitation compares."""

from __future__ import annotations

import logging
import math
from typing import ClassVar

import torch
import torch.nn.functional as F

from ...config import Config
from ...data.datasets import dataset_of
from ...data.mlm import IGNORE
from ..bridge import Bridges
from ..task import ScoredTask

log = logging.getLogger("gwtn")
_warned_one_split: set[str] = set()  # shard folders already warned about (once per process)


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


class TextTask(ScoredTask):
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
    digits: ClassVar[dict[str, int]] = {"perplexity": 2, "val_perplexity": 2}

    def __init__(self, cfg: Config):
        super().__init__(cfg)
        counts = dataset_of(cfg).split_samples(cfg)
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

    def is_score(self, key: str) -> bool:
        return key.endswith(("_accuracy", "perplexity"))

    def tokens(self, x: dict[str, torch.Tensor]) -> torch.Tensor:
        """The batch's unpadded tokens: attention_mask (b, T) summed, on the device (no sync)."""
        return x["attention_mask"].sum()

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
        between layers), in the forward's dtype (imitation casts it to the compute dtype)."""
        return model(x, upto=end)

    def segment(self, model, x: dict[str, torch.Tensor], start: int, end: int, h: torch.Tensor,
                attention: bool = False):
        """Layers ``start``..``end`` (block indices, ≥ 1) run on h (b, T, D), block ``start``'s
        input, under x's attention mask; block ``end``'s output in the forward's dtype, and
        with ``attention`` also its attention maps (b, H, T, T) in float32."""
        out = model.run_blocks(h, start, end, x["attention_mask"], attention=attention)
        return (out[0], out[1].float()) if attention else out

    def feature_mask(self, x: dict[str, torch.Tensor]) -> torch.Tensor:
        return x["attention_mask"].bool()  # (b, T): padded positions are left out of the loss

    def normalize(self, t: torch.Tensor) -> torch.Tensor:
        """Normalise (B, T, D) over D, no affine (MobileBERT's layer-normalised targets)."""
        return F.layer_norm(t, t.shape[-1:])

    def imitation_outputs(self, wide, thin, x: dict[str, torch.Tensor], end: int,
                          bridges: Bridges | None, bridged: dict[int, str], site: dict,
                          maps: bool):
        """With ``maps`` (``imitate.attention_weight``): layer outputs (b, T, D) of both nets
        and the KL between their attention maps (b, H, T, T) at layer ``end``."""
        if not maps:
            return super().imitation_outputs(wide, thin, x, end, bridges, bridged, site, maps)
        target, wide_maps = wide(x, upto=end, attention=True)
        h, thin_maps = (t.float() for t in thin(x, upto=end, attention=True))
        return target, h, self.maps_loss(wide_maps, thin_maps, self.feature_mask(x))

    def first_segment(self, thin, x: dict[str, torch.Tensor], end: int, maps: bool):
        if not maps:
            return super().first_segment(thin, x, end, maps)
        return tuple(t.float() for t in thin(x, upto=end, attention=True))

    def maps_loss(self, wide_maps: torch.Tensor, thin_maps: torch.Tensor,
                  mask: torch.Tensor) -> torch.Tensor:
        return attention_kl(wide_maps, thin_maps, mask)
