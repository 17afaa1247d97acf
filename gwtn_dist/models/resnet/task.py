"""The ResNet family's task: image classification (test accuracy and cross-entropy), and the
block outputs (B, c, H, W) that imitation compares."""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F

from ...config import Config
from ...data.datasets import dataset_of
from ..bridge import Bridges
from ..task import ScoredTask
from .net import run_block


def run_prefix(model, x: torch.Tensor, last: int, bridges: Bridges | None = None,
               bridged: dict[int, str] | None = None, preact: bool = False) -> torch.Tensor:
    """Run blocks 0..last of a ResNet on x (B, C_in, H, W); returns block ``last``'s output
    (before its final ReLU with ``preact``).

    ``bridged`` maps a block index to the point whose pair (Q P) follows that block.
    """
    for i, (_, block) in enumerate(model.blocks()[: last + 1]):
        x = run_block(block, x, preact and i == last)
        if bridges is not None and bridged and i in bridged and i != last:
            x = bridges.pair(bridged[i])(x)
    return x


class ImageTask(ScoredTask):
    """Image classification with a ResNet: test accuracy and cross-entropy."""

    channel_dim = 1  # block outputs are (B, C, H, W)

    metric = "test_accuracy"
    metric_label = "test accuracy"
    secondary: tuple[str, ...] = ()
    labels: ClassVar[dict[str, str]] = {"val_accuracy": "val accuracy",
                                        "test_accuracy": "test accuracy"}
    validation: str | None = None  # compare.md describes the split from data.val_samples

    def __init__(self, cfg: Config):
        super().__init__(cfg)
        self.memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
        has_val = dataset_of(cfg).carves_validation(cfg)
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
                 bridged: dict[int, str], preact: bool = False) -> torch.Tensor:
        """Block ``end``'s output (b, c, H', W'), through the pairs already passed (before
        its final ReLU with ``preact``), in the dtype the forward computed it in (bf16/fp16
        under autocast: the loss reads 16 bits)."""
        return run_prefix(model, x, end, bridges, bridged, preact)

    def segment(self, model, x: torch.Tensor, start: int, end: int, h: torch.Tensor,
                attention: bool = False, preact: bool = False) -> torch.Tensor:
        """Blocks ``start``..``end`` run on h (b, c, H, W), block ``start``'s input (the
        parallel imitation schedule's teacher-fed segment); block ``end``'s output (before its
        final ReLU with ``preact``), in the forward's dtype."""
        return model.run_blocks(h, start, end, preact)

    def feature_mask(self, x: torch.Tensor) -> None:
        return None  # every position of an image counts

    def normalize(self, t: torch.Tensor) -> torch.Tensor:
        """Normalise (B, C, H, W) over C at each position, no affine (MobileBERT-style)."""
        return F.layer_norm(t.permute(0, 2, 3, 1), t.shape[1:2]).permute(0, 3, 1, 2)


