"""Choosing between the fused Triton imitation loss and the PyTorch reference, and the loss as
an ``nn.Module`` that chooses per input device.

Nothing here imports triton: the package must import (and the reference must work) on machines
without triton or without a GPU.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from .availability import require_triton, triton_unavailable_reason
from .notes import notes
from .op import imitation_mse
from .reference import imitation_mse_reference

BACKENDS = ("auto", "triton", "reference")


def select_imitation_mse(backend: str, device: torch.device | str) -> Callable[..., torch.Tensor]:
    """The imitation-loss function to use for ``backend`` on ``device``.

    Args:
        backend: ``"auto"`` (fused Triton kernels on CUDA, the PyTorch reference elsewhere,
            including on CPU even under TRITON_INTERPRET), ``"triton"`` (always the fused
            kernels; RuntimeError if they cannot run on ``device``, e.g. CPU without
            TRITON_INTERPRET=1) or ``"reference"``.
        device: where the features live.

    Returns:
        A callable with the signature of :func:`imitation_mse`.

    Raises:
        ValueError: unknown backend.
        RuntimeError: ``"triton"`` requested where the kernels cannot run.
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown imitation-loss backend {backend!r}; "
                         f"allowed: {', '.join(BACKENDS)}")
    device = torch.device(device)
    if backend == "reference":
        return imitation_mse_reference
    if backend == "auto":
        usable = device.type == "cuda" and triton_unavailable_reason(device) is None
        return imitation_mse if usable else imitation_mse_reference
    require_triton(device)
    return imitation_mse


def describe_run(fn: Callable[..., torch.Tensor], dtype: torch.dtype) -> dict:
    """What a stage records of the imitation loss it ran: ``backend`` (``triton`` or
    ``reference``), the feature ``dtype`` it was given, for the kernels whether their tiles were
    ``pinned`` or ``autotuned``, and any ``notes`` (fallbacks taken, see ``notes.py``)."""
    record = {"backend": "triton" if fn is imitation_mse else "reference",
              "dtype": str(dtype).removeprefix("torch.")}
    if fn is imitation_mse:
        from .kernel import pinned_tiles  # imports triton: the kernels ran, so it is there

        record["tiles"] = "pinned" if pinned_tiles() else "autotuned"
    record["notes"] = notes()
    return record


class ImitationMSE(nn.Module):
    """``nn.Module`` form of the imitation loss; the backend is chosen per input device.

    Args:
        reduction: ``"mean"`` or ``"sum"``.
        backend: ``"auto"`` (fused kernels on CUDA, reference elsewhere), ``"triton"`` or
            ``"reference"``; see :func:`select_imitation_mse`.

    The lift (weight, bias) is owned by the caller and passed to :meth:`forward`.
    """

    def __init__(self, reduction: str = "mean", backend: str = "auto") -> None:
        super().__init__()
        if reduction not in ("mean", "sum"):
            raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
        if backend not in BACKENDS:
            raise ValueError(f"unknown imitation-loss backend {backend!r}; "
                             f"allowed: {', '.join(BACKENDS)}")
        self.reduction = reduction
        self.backend = backend

    def forward(
        self,
        x: torch.Tensor,
        target: torch.Tensor,
        weight: torch.Tensor | None = None,
        bias: torch.Tensor | None = None,
        residual: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        fn = select_imitation_mse(self.backend, x.device)
        return fn(x, target, weight, bias, residual, reduction=self.reduction, mask=mask)

    def extra_repr(self) -> str:
        return f"reduction={self.reduction!r}, backend={self.backend!r}"
