"""What one training step allocates, measured by running it on the meta device.

A net built on the ``meta`` device has shapes and dtypes but no storage, so running a step
there costs no memory and little time whatever the net's size, while every operator still
makes its outputs with their true sizes. :class:`LiveBytes` is a dispatch mode that sees
every operator's outputs, counts the bytes of each new storage from its birth until Python and
autograd let it go (a weak reference's callback), and keeps the peak: the activations that a
forward keeps for the backward, the gradients as the backward makes them, every temporary.
:class:`~torch.utils.flop_counter.FlopCounterMode` counts the step's floating-point
operations at the same time (what the planner projects step times with).

What this cannot see: memory a kernel allocates inside itself (cuDNN and oneDNN workspaces),
the caching allocator's rounding and fragmentation, and anything outside the step.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import FlopCounterMode

aten = torch.ops.aten
# Operators whose output size depends on the values of a boolean mask, which meta tensors do
# not have: selections are given the share ``selected`` of the mask's elements instead.
MASKED = {aten.index.Tensor, aten.index_put.default, aten.index_put_.default,
          aten._index_put_impl_.default}


class LiveBytes(TorchDispatchMode):
    """Bytes of the storages made inside the mode that are still alive (``live``), and the
    most that were alive at once (``peak``). Storages that existed before (parameters,
    inputs) are not counted; views share their base's storage and are counted once.

    selected: the share of a boolean mask's elements that are true, for the selections whose
    size depends on it (masked-LM's chosen tokens, ``x[mask]`` and its backward), which the
    meta device cannot know.
    """

    def __init__(self, selected: float = 1.0) -> None:
        super().__init__()
        self.selected = selected
        self.live = 0
        self.peak = 0
        self._refs: dict[int, weakref.ref] = {}  # id(storage) → a weak reference to it

    def _positions(self, mask: torch.Tensor) -> list[torch.Tensor]:
        """Index tensors standing for the true elements of ``mask``: (n,) per mask dim."""
        n = max(1, round(mask.numel() * self.selected))
        return [torch.empty(n, dtype=torch.long, device=mask.device)] * mask.dim()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is aten.nonzero.default:
            n = max(1, round(args[0].numel() * self.selected))
            return torch.empty(n, args[0].dim(), dtype=torch.long, device=args[0].device)
        if func in MASKED and any(isinstance(i, torch.Tensor) and i.dtype == torch.bool
                                  for i in args[1]):
            indices = [p for i in args[1] for p in (
                self._positions(i) if isinstance(i, torch.Tensor) and i.dtype == torch.bool
                else [i])]
            args = (args[0], indices, *args[2:])
        out = func(*args, **(kwargs or {}))
        # A view or an in-place result lives in an input's storage: nothing new.
        inputs = {t.untyped_storage()._cdata for t in tree_flatten((args, kwargs))[0]
                  if isinstance(t, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.untyped_storage()._cdata not in inputs:
                self._count(t.untyped_storage())
        return out

    def _count(self, storage: torch.UntypedStorage) -> None:
        key = storage._cdata  # the storage itself, whichever Python object stands for it
        ref = self._refs.get(key)
        if ref is not None and ref() is not None:
            return  # already counted (a view made outside an operator, e.g. by autograd)
        size = storage.nbytes()
        self._refs[key] = weakref.ref(storage, lambda _, key=key, size=size:
                                      self._release(key, size))
        self.live += size
        self.peak = max(self.peak, self.live)

    def _release(self, key: int, size: int) -> None:
        self._refs.pop(key, None)
        self.live -= size


@dataclass(frozen=True)
class StepTrace:
    """One traced step: ``peak`` bytes alive at once above what existed before it, ``kept``
    bytes still alive after it (the step's results: gradients, kept outputs), and ``flops``
    (multiply-adds count 2)."""

    peak: int
    kept: int
    flops: int


def trace(step: Callable[[], object], selected: float = 1.0) -> StepTrace:
    """Run ``step()`` (on meta tensors) and measure it; whatever it returns is dropped before
    ``kept`` is read, so only what outlives the step (gradients in ``.grad``) counts there.
    ``selected``: the share of a boolean mask's elements taken to be true (``LiveBytes``)."""
    live = LiveBytes(selected)
    flops = FlopCounterMode(display=False)
    with flops, live:
        result = step()
        del result
    return StepTrace(peak=live.peak, kept=live.live, flops=flops.get_total_flops())
