"""Task and distillation losses on logits (B, num_classes)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def distillation_loss(student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor,
                      alpha: float, temperature: float) -> torch.Tensor:
    """alpha·T²·KL(softmax(teacher/T) ‖ softmax(student/T)) + (1 − alpha)·CE(student, labels).

    The T² keeps the soft term's gradient scale independent of T (Hinton et al.).
    """
    t = temperature
    soft = F.kl_div(F.log_softmax(student / t, dim=1), F.log_softmax(teacher / t, dim=1),
                    reduction="batchmean", log_target=True)
    return alpha * t * t * soft + (1 - alpha) * F.cross_entropy(student, labels)
