"""Fused imitation (feature-matching) loss, installed as ``gwtn_dist.kernels.imitation``.

Modules: ``layout`` (argument checks, row views), ``reference`` (plain PyTorch), ``kernel``
(Triton kernels; imports triton), ``fused`` (chunked forward computing loss and gradients),
``availability`` (whether the kernels can run here), ``op`` (autograd Function, public
function), ``backend`` (backend selection, the nn.Module).
Importing this package does not import triton.
"""

from .backend import BACKENDS, ImitationMSE, select_imitation_mse
from .op import imitation_mse
from .reference import imitation_mse_reference

__all__ = [
    "BACKENDS",
    "ImitationMSE",
    "imitation_mse",
    "imitation_mse_reference",
    "select_imitation_mse",
]
