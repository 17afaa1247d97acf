"""Our ResNet's parameter names ↔ torchvision's (timm's ResNets use torchvision's names).

The nets differ in names only: our stem is ``stem.0`` (conv) and ``stem.1`` (batch norm) where
torchvision has ``conv1`` and ``bn1``, and a block's projection shortcut is ``shortcut`` where
torchvision has ``downsample``; ``layerI.J.conv1`` … ``bn3`` and ``fc`` are the same, and so is
every tensor's layout. torchvision's resnet50 is our ``geometry: imagenet`` net with stem 64,
blocks [3, 4, 6, 3] and inner widths [64, 128, 256, 512]; its wide_resnet50_2 doubles the inner
widths (our twin with ``widen.inner_mult: 2``).
"""

from __future__ import annotations

import torch

from ..weights import WeightsError, load_mapped
from .net import ResNet, ResNetShape

# (our prefix, torchvision's) at the start of a name, and (ours, theirs) anywhere in it.
_START = (("stem.0.", "conv1."), ("stem.1.", "bn1."))
_INSIDE = ((".shortcut.", ".downsample."),)

# torchvision's bottleneck ResNets by depth; a "wide_" one doubles the inner widths.
_TORCHVISION_DEPTHS = {(3, 4, 6, 3): "resnet50", (3, 4, 23, 3): "resnet101",
                       (3, 8, 36, 3): "resnet152"}


def _renamed(name: str, pairs_start, pairs_inside) -> str:
    """``name`` with the first matching (old, new) prefix of ``pairs_start`` replaced, or else
    every (old, new) of ``pairs_inside`` replaced inside it."""
    for old, new in pairs_start:
        if name.startswith(old):
            return new + name[len(old):]
    for old, new in pairs_inside:
        name = name.replace(old, new)
    return name


def torchvision_name(ours: str) -> str:
    """torchvision's (and timm's) name of one of our parameter or buffer names."""
    return _renamed(ours, _START, _INSIDE)


def our_name(name: str) -> str:
    """Our name of a torchvision/timm name; our own names come back unchanged."""
    return _renamed(name, [(b, a) for a, b in _START], [(b, a) for a, b in _INSIDE])


def torchvision_state_dict(model: ResNet) -> dict[str, torch.Tensor]:
    """``model``'s state dict under torchvision's names (CPU, contiguous: ready to save)."""
    return {torchvision_name(k): v.detach().cpu().contiguous()
            for k, v in model.state_dict().items()}


def torchvision_arch(shape: ResNetShape) -> str | None:
    """The torchvision constructor that builds this shape (``resnet50``, ``wide_resnet50_2``
    …), or None when there is none."""
    name = _TORCHVISION_DEPTHS.get(tuple(shape.blocks))
    if (name is None or shape.geometry != "imagenet" or shape.in_channels != 3
            or shape.stem_width != 64 or tuple(shape.boundary_widths) != (256, 512, 1024, 2048)):
        return None
    inner = tuple(shape.inner_widths)
    if inner == (64, 128, 256, 512):
        return name
    if inner == (128, 256, 512, 1024) and name != "resnet152":
        return f"wide_{name}_2"
    return None


def load_resnet_weights(model: ResNet, tensors: dict[str, torch.Tensor]) -> None:
    """Load ``tensors`` (our, torchvision's or timm's names) into ``model``.

    Checked before anything is copied, in the net's forward order: the first tensor whose shape
    differs, then the first of the net's tensors that is missing, then the first name the net
    does not have, each a WeightsError naming the key (and both shapes). Missing
    ``num_batches_tracked`` counters (old torchvision and some timm files lack them) keep ours.
    """
    mapped: dict[str, tuple[str, torch.Tensor]] = {}
    for name, value in tensors.items():
        ours = our_name(name)
        if ours in mapped:
            raise WeightsError(f"{name} and {mapped[ours][0]} both name our {ours}")
        mapped[ours] = (name, value)
    load_mapped(model, mapped, outside_name=torchvision_name,
                unknown="this ResNet (in our, torchvision's or timm's names)",
                optional=lambda ours: ours.endswith("num_batches_tracked"))
