"""Triton kernels, installed as ``gwtn_dist.kernels``.

Importing this package never imports triton (the kernels load on first use), so the PyTorch
reference implementations work on machines without triton or a GPU.
"""

from .imitation import (
    ImitationMSE,
    imitation_mse,
    imitation_mse_reference,
    select_imitation_mse,
)

__all__ = ["ImitationMSE", "imitation_mse", "imitation_mse_reference", "select_imitation_mse"]
