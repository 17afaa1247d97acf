"""Atomic checkpoints and the consolidated weights handed from one stage to the next."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch


def atomic_save(obj: Any, path: Path | str) -> None:
    """torch.save to a temporary file in the same folder, fsync, then rename over ``path``.

    A crash at any moment leaves either the old file or the new one, never a torn file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load(path: Path | str) -> Any:
    return torch.load(path, map_location="cpu", weights_only=False)


def save_weights(model: torch.nn.Module, path: Path | str, meta: dict) -> None:
    """Consolidated weights + what is needed to rebuild the net (``meta``: shape, stage …)."""
    atomic_save({"state_dict": model.state_dict(), "meta": meta}, path)


def load_weights(model: torch.nn.Module, path: Path | str) -> dict:
    """Load weights written by ``save_weights`` into ``model``; returns their meta."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found")
    blob = load(path)
    model.load_state_dict(blob["state_dict"])
    return blob["meta"]
