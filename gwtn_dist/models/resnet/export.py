"""``gwtn export`` for a ResNet: a torchvision/timm-named state dict and its shape."""

from __future__ import annotations

import json
from pathlib import Path

from ... import checkpoint
from .names import torchvision_arch, torchvision_state_dict
from .net import ResNet


def export_resnet(model: ResNet, out: Path) -> list[Path]:
    """Write ``model`` as a torchvision/timm-named state dict in ``out``; returns the files."""
    out.mkdir(parents=True, exist_ok=True)
    tensors = torchvision_state_dict(model)
    files = [out / "model.pt"]
    checkpoint.atomic_save(tensors, files[0])
    if checkpoint.safetensors_available():
        files.append(out / "model.safetensors")
        checkpoint.save_safetensors(tensors, files[-1])
    config = {"family": "resnet", "naming": "torchvision", "shape": model.shape.__dict__,
              "torchvision_arch": torchvision_arch(model.shape)}
    (out / "config.json").write_text(json.dumps(config, indent=2))
    return [*files, out / "config.json"]
