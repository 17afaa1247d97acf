"""Choosing between the fused Triton imitation loss and the PyTorch reference.

Nothing here imports triton: the package must import (and the reference must work) on machines
without triton or without a GPU.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from collections.abc import Callable

import torch

BACKENDS = ("auto", "triton", "reference")
_KERNEL_MODULE = __name__.rsplit(".", 1)[0] + ".kernel"
_TRUTHY = {"1", "true", "yes", "on", "y"}


def interpreter_requested() -> bool:
    """Whether TRITON_INTERPRET asks for Triton's CPU interpreter (triton's truthy spellings)."""
    return os.environ.get("TRITON_INTERPRET", "").strip().lower() in _TRUTHY


def triton_unavailable_reason(device: torch.device) -> str | None:
    """Why the Triton kernels cannot run on ``device`` here, or None if they can."""
    if importlib.util.find_spec("triton") is None:
        return ("the triton backend of imitation_mse needs the `triton` package, which is not "
                "installed")
    if device.type == "cuda":
        return None
    if device.type != "cpu":
        return ("the triton backend of imitation_mse supports CUDA devices only, not "
                f"{device.type!r}")
    if not interpreter_requested():
        return (
            "the triton backend of imitation_mse needs a CUDA device; on CPU it only runs under "
            "Triton's interpreter, enabled by setting TRITON_INTERPRET=1 before the kernels are "
            "imported (use backend='reference' or 'auto' on CPU)"
        )
    kernel_module = sys.modules.get(_KERNEL_MODULE)
    if kernel_module is not None and not kernel_module.INTERPRETED:
        return (
            "TRITON_INTERPRET=1 was set after the imitation kernels were compiled for GPU; "
            "set it before they are first used"
        )
    return None


def require_triton(device: torch.device) -> None:
    """Raise RuntimeError (with the reason) unless the Triton kernels can run on ``device``."""
    reason = triton_unavailable_reason(device)
    if reason is not None:
        raise RuntimeError(reason)


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
    from .op import imitation_mse
    from .reference import imitation_mse_reference

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
    from .notes import notes
    from .op import imitation_mse

    record = {"backend": "triton" if fn is imitation_mse else "reference",
              "dtype": str(dtype).removeprefix("torch.")}
    if fn is imitation_mse:
        from .kernel import pinned_tiles  # imports triton: the kernels ran, so it is there

        record["tiles"] = "pinned" if pinned_tiles() else "autotuned"
    record["notes"] = notes()
    return record
