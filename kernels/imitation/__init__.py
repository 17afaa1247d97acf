"""Fused imitation (feature-matching) loss, installed as ``gwtn_dist.kernels.imitation``.

Modules: ``layout`` (argument checks, row views), ``reference`` (plain PyTorch), ``kernel``
(Triton kernels; imports triton), ``fused`` (chunked forward computing loss and gradients),
``op`` (autograd Function, public function, nn.Module), ``backend`` (backend selection).
Importing this package does not import triton.
"""

from .backend import BACKENDS, select_imitation_mse
from .op import ImitationMSE, imitation_mse
from .reference import imitation_mse_reference

__all__ = [
    "BACKENDS",
    "ImitationMSE",
    "imitation_mse",
    "imitation_mse_reference",
    "select_imitation_mse",
]
