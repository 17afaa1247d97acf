"""Whether the fused Triton imitation kernels can run on a device here, and why not.

Both ``op`` (the kernels' public function) and ``backend`` (the choice between kernels and
reference, which imports ``op``) ask it, so ``op`` needs nothing of ``backend``. Nothing here
imports triton: the package must import (and the reference must work) on machines without
triton or a GPU.
"""

from __future__ import annotations

import importlib.util
import os
import sys

import torch

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
