"""Reading weights made elsewhere and loading them into our nets, checked before anything is
copied: one reader for weight files and one shape-by-shape check shared by the name maps
(each family's ``names`` module: ``resnet/names.py`` for torchvision/timm,
``bert/names.py`` for Hugging Face)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from ..checkpoint import why_unreadable


class WeightsError(ValueError):
    """A state dict that does not fit the net it is loaded into."""


class UnreadableWeights(WeightsError):
    """A weights file that cannot be read (torn, not a weights file, or a pickle that would
    run code): an unreadable file (exit 4), not a net of the wrong shape."""


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a weights file: a .safetensors file, or a torch file (read with
    ``weights_only=True``) holding a dict of tensors, directly or under ``state_dict`` or
    ``model``. Raises WeightsError when it holds something else or cannot be read."""
    path = Path(path)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            blob = load_file(str(path))
        else:
            blob = torch.load(path, map_location="cpu", weights_only=True)
    except ImportError:
        raise WeightsError(f"{path}: reading .safetensors needs the safetensors package") from None
    except Exception as exc:  # any failure to read means "not a weights file we can use"
        raise UnreadableWeights(f"{path} cannot be read as weights "
                                f"({why_unreadable(exc)})") from exc
    for key in ("state_dict", "model"):
        if isinstance(blob, dict) and isinstance(blob.get(key), dict):
            blob = blob[key]
            break
    if not isinstance(blob, dict) or not blob:
        raise UnreadableWeights(f"{path} holds no state dict (a mapping of names to tensors)")
    for name, value in blob.items():
        if not torch.is_tensor(value):
            raise UnreadableWeights(f"{path}: {name} is a {type(value).__name__}, not a tensor")
    # A DistributedDataParallel wrapper's prefix.
    if all(str(k).startswith("module.") for k in blob):
        blob = {k[len("module."):]: v for k, v in blob.items()}
    return blob


def load_mapped(model: nn.Module, mapped: dict[str, tuple[str, torch.Tensor]], *,
                outside_name: Callable[[str], str], unknown: str,
                optional: Callable[[str], bool] = lambda ours: False) -> None:
    """Load ``mapped`` (our name → (the file's name, tensor)) into ``model``.

    Checked in the net's forward order before anything is copied: the first tensor whose shape
    differs, then the first of the net's tensors that is missing (named by ``outside_name``),
    then the first name the net does not have (``unknown`` says what the net is). Tensors for
    which ``optional`` is true may be missing and keep the net's values.
    """
    own = model.state_dict()
    for ours, target in own.items():
        if ours in mapped and tuple(mapped[ours][1].shape) != tuple(target.shape):
            name, value = mapped[ours]
            raise WeightsError(f"{name} has shape {tuple(value.shape)}, but the net's {ours} "
                               f"has {tuple(target.shape)}")
    for ours in own:
        if ours not in mapped and not optional(ours):
            raise WeightsError(f"{outside_name(ours)} (our {ours}) is missing")
    for ours, (name, _) in mapped.items():
        if ours not in own:
            raise WeightsError(f"{name} is not a tensor of {unknown}")
    model.load_state_dict({k: mapped[k][1] if k in mapped else v for k, v in own.items()})
