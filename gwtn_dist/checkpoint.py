"""Atomic checkpoints and the consolidated weights handed from one stage to the next.

Every file we write is plain dicts, lists, numbers and tensors, so every file we read is read
with ``weights_only=True``: a crafted file cannot run code, it is refused with a clear error.
"""

from __future__ import annotations

import errno
import importlib.util
import logging
import os
import pickle
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import torch

log = logging.getLogger("gwtn")


class CheckpointError(RuntimeError):
    """A checkpoint or weights file that cannot be read safely (torn, corrupt or foreign)."""


def _fsync_folder(folder: Path) -> None:
    """Make a rename in ``folder`` durable (the folder entry, not just the file's bytes)."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _atomic_write(path: Path, write: Callable[[BinaryIO], None],
                  keep_previous: bool = False) -> None:
    """``write`` into a temporary file in ``path``'s folder, fsync, then rename over ``path``
    (and fsync the folder); see ``atomic_save``. A write that fails (a full disk: torch's
    writer says so as a RuntimeError) leaves no temporary file and raises an ``OSError`` that
    names ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        if keep_previous and path.is_file():
            os.replace(path, previous_path(path))
        os.replace(tmp, path)
    except BaseException as exc:  # Ctrl-C too: nothing half-written stays behind
        tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise OSError(exc.errno, exc.strerror or str(exc), str(path)) from exc
        if isinstance(exc, RuntimeError):
            raise write_error(path, exc) from exc
        raise
    _fsync_folder(path.parent)


def write_error(path: Path, exc: BaseException) -> OSError:
    """The ``OSError`` for a write of ``path`` that failed with a non-OSError (torch's zip
    writer reports a full disk as ``RuntimeError: … unexpected pos``): ENOSPC when the folder's
    disk has under 1 MiB left, else EIO with the writer's reason."""
    try:
        full = shutil.disk_usage(path.parent).free < (1 << 20)
    except OSError:
        full = False
    if full:
        return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return OSError(errno.EIO, f"could not write ({first[:200]})", str(path))


def atomic_write_text(path: Path | str, text: str) -> None:
    """Write ``text`` to ``path`` atomically (``_atomic_write``): a crash or a full disk leaves
    the old file or the new one, never a torn one."""
    data = text.encode()
    _atomic_write(Path(path), lambda f: f.write(data))


def atomic_save(obj: Any, path: Path | str, keep_previous: bool = False) -> None:
    """torch.save to a temporary file in the same folder, fsync, then rename over ``path``
    (and fsync the folder).

    A crash at any moment leaves either the old file or the new one, never a torn file.
    keep_previous: first move the current file to ``previous_path(path)``, so the last two
    stay on disk (a resume falls back to the older one if the newer cannot be read).
    """
    _atomic_write(Path(path), lambda f: torch.save(obj, f), keep_previous)


def safetensors_available() -> bool:
    """Whether the optional ``safetensors`` package can be imported."""
    return importlib.util.find_spec("safetensors") is not None


def save_safetensors(tensors: dict[str, torch.Tensor], path: Path | str) -> None:
    """Write a flat dict of tensors as a .safetensors file, atomically (needs ``safetensors``)."""
    from safetensors.torch import save

    data = save(tensors, metadata={"format": "pt"})
    _atomic_write(Path(path), lambda f: f.write(data))


def previous_path(path: Path | str) -> Path:
    """Where ``atomic_save(..., keep_previous=True)`` keeps the file it replaced."""
    path = Path(path)
    return path.with_name(path.stem + ".prev" + path.suffix)


def load(path: Path | str) -> Any:
    """Read one of our files safely (``weights_only=True``); anything unreadable or not ours
    is a ``CheckpointError`` that names the file."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as exc:  # any failure to unpickle means "not readable"
        raise CheckpointError(f"{path} cannot be read safely ({why_unreadable(exc)}); it is "
                              f"torn, corrupt, or not a file written by gwtn") from exc


def why_unreadable(exc: BaseException) -> str:
    """A short reason for a failed safe load. torch's own weights-only message opens with how
    to turn the check off; that is never the advice here, so only what the file held is kept."""
    text = str(exc).strip()
    if isinstance(exc, pickle.UnpicklingError):
        found = re.search(r"GLOBAL ([\w.]+)", text)
        held = f" ({found.group(1)})" if found else ""
        return f"it holds a Python object{held}, not plain tensors, and gwtn runs no code from " \
               f"a file"
    first = text.splitlines()[0] if text else type(exc).__name__
    return first[:200]


def load_with_fallback(path: Path | str) -> Any:
    """``load(path)``, or, when it is unreadable, the previous copy kept beside it (with a
    warning). Raises ``CheckpointError`` when neither can be read."""
    try:
        return load(path)
    except CheckpointError as exc:
        older = previous_path(path)
        if not older.is_file():
            raise
        log.warning("%s; resuming from the previous checkpoint %s", exc, older)
        return load(older)


def save_weights(model: torch.nn.Module, path: Path | str, meta: dict) -> None:
    """Consolidated weights + what is needed to rebuild the net (``meta``: shape, stage …)."""
    atomic_save({"state_dict": model.state_dict(), "meta": meta}, path)


def load_state(module: torch.nn.Module, state: object, path: Path | str) -> None:
    """``module.load_state_dict(state)``, checked first (``check_state``)."""
    check_state(module, state, path)
    module.load_state_dict(state)


def check_state(module: torch.nn.Module, state: object, path: Path | str) -> None:
    """Anything that is not a state dict of ``module`` (another shape, another net, not
    tensors) is a ``CheckpointError`` naming ``path`` and the first tensor that does not fit.
    Shapes only: ``module`` may live on the meta device."""
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise CheckpointError(f"{path} holds no weights (a mapping of names to tensors) where "
                              f"a {type(module).__name__}'s are expected")
    own = module.state_dict()
    for name, tensor in own.items():
        if name not in state:
            raise CheckpointError(f"{path} lacks {name}: it holds another net's weights")
        if tuple(state[name].shape) != tuple(tensor.shape):
            raise CheckpointError(f"{path}: {name} has shape {tuple(state[name].shape)}, but "
                                  f"the net's has {tuple(tensor.shape)}: it holds a net of "
                                  f"another shape")
    extra = next((name for name in state if name not in own), None)
    if extra is not None:
        raise CheckpointError(f"{path}: {extra} is not a tensor of this net: it holds another "
                              f"net's weights")


def load_weights(model: torch.nn.Module, path: Path | str) -> dict:
    """Load weights written by ``save_weights`` into ``model``; returns their meta. A file
    that does not hold weights of this net is a ``CheckpointError`` naming it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found")
    blob = load(path)
    if not isinstance(blob, dict) or "state_dict" not in blob:
        raise CheckpointError(f"{path} is not a stage's model.pt (no state_dict in it)")
    load_state(model, blob["state_dict"], path)
    return blob.get("meta") if isinstance(blob.get("meta"), dict) else {}
