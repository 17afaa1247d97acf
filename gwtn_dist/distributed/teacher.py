"""The frozen wide teacher of imitation and distillation: sharded over the ranks or replicated.

``shard``: a ZeRO-3 engine without optimizer; each rank holds 1/world of every parameter and
the forward gathers a block's parameters just before the block runs. ``replicate``: every rank
holds the whole net. ``auto`` replicates when the whole teacher takes at most
``dist.teacher_memory_fraction`` of a rank's free memory (GPU memory on CUDA, the machine's
available memory shared by the node's ranks on CPU), since gathering costs communication on
every forward; one rank always replicates.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from .. import checkpoint
from ..config import Config
from ..models.compiled import compile_blocks
from ..profiling import region
from .engines import full_state_dict, held_bytes, shard_frozen
from .runtime import Runtime

log = logging.getLogger("gwtn")


def free_bytes_per_rank(device: torch.device, local_world_size: int) -> int:
    """Memory one rank may use: free GPU memory, or MemAvailable over the node's
    ``local_world_size`` ranks."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    available = 0
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            available = int(line.split()[1]) * 1024
    return available // max(1, local_world_size)


def choose_mode(wanted: str, total_bytes: int, free_bytes: int, fraction: float,
                world_size: int) -> tuple[str, str]:
    """(``shard`` or ``replicate``, the reason) for a teacher of ``total_bytes``."""
    if world_size == 1:
        return "replicate", "one rank: nothing to shard over"
    if wanted != "auto":
        return wanted, f"dist.teacher={wanted}"
    share = total_bytes / max(free_bytes, 1)
    sizes = f"{total_bytes / 2**20:.1f} MiB teacher, {free_bytes / 2**20:.0f} MiB free per rank"
    if share <= fraction:
        return "replicate", f"{sizes}: {share:.1%} <= {fraction:.0%} (dist.teacher_memory_fraction)"
    return "shard", f"{sizes}: {share:.1%} > {fraction:.0%} (dist.teacher_memory_fraction)"


class Teacher:
    """Callable frozen wide net: ``teacher(x, upto=k)`` → block k's output, else the logits.

    Image inputs (B, C, H, W) are cast to the training precision (token ids stay integers);
    other keywords go to the net's forward (a BERT's ``select``, ``attention``; ``points`` for
    several blocks' outputs from one pass); outputs, or each output of a (nested) tuple, come
    back in the training's compute dtype (the autocast dtype, else the weights'): imitation
    targets reach the loss in 16 bits under bf16/fp16, where float32 copies would double the
    bytes the loss reads (the loss accumulates in float32 itself).
    """

    def __init__(self, module: nn.Module, net, mode: str, reason: str, rt: Runtime):
        self.module = module  # the wide ResNet (partitioned when sharded)
        self.net = net  # what runs the forward: the module itself or its ZeRO-3 engine
        self.mode, self.reason = mode, reason
        self.dtype = rt.dtype  # the training precision
        self.compute_dtype = rt.autocast or rt.dtype  # what the forward computes in
        self.world_size = rt.world_size

    @torch.no_grad()
    def __call__(self, x, upto: int | None = None, **kwargs):
        with region("teacher_forward"):
            if torch.is_tensor(x):
                x = x.to(self.dtype)
            return _in_dtype(self.net(x, upto=upto, **kwargs), self.compute_dtype)

    def head(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The classifier's weight (classes, C) and bias (classes,), whole, in float32."""
        state = self.state_of("fc")
        return state["weight"], state["bias"]

    def state_of(self, name: str) -> dict:
        """The whole state of submodule ``name`` (e.g. a BERT's ``mlm`` head), in float32."""
        state = full_state_dict(self.module.get_submodule(name))
        return {k: v.float() for k, v in state.items()}

    def record(self) -> dict:
        """What summary.json says about the teacher's memory."""
        held, total = held_bytes(self.module)
        return {"mode": self.mode, "reason": self.reason, "world_size": self.world_size,
                "param_bytes_per_rank": held, "param_bytes_total": total}


def _in_dtype(out, dtype: torch.dtype):
    """A tensor, or a (nested) tuple of tensors and Nones, in ``dtype`` (a no-op where it is)."""
    if isinstance(out, tuple):
        return tuple(_in_dtype(o, dtype) for o in out)
    return None if out is None else out.to(dtype)


def load_teacher(rt: Runtime, cfg: Config, wide: nn.Module, path: Path,
                 device: torch.device) -> Teacher:
    """The trained wide net from ``path`` loaded into ``wide`` (a fresh wide twin), frozen
    (eval mode, no grads), sharded or replicated."""
    checkpoint.load_weights(wide, path)
    wide.eval().requires_grad_(False)
    total = sum(p.numel() for p in wide.parameters()) * torch.finfo(rt.dtype).bits // 8
    free = free_bytes_per_rank(device, rt.env.local_world_size)
    mode, reason = choose_mode(cfg.dist.teacher, total, free, cfg.dist.teacher_memory_fraction,
                               rt.world_size)
    if rt.is_main:
        log.info("teacher: %s (%s)", mode, reason)
    if mode == "shard":
        wide = wide.to(device=device, dtype=rt.dtype)  # contiguous: ZeRO-3 partitions storage
        net = shard_frozen(rt, wide, cfg.dist, cfg.data.batch_size // rt.world_size)
    else:
        net = wide.to(device=device, dtype=rt.dtype, memory_format=torch.channels_last
                      if cfg.channels_last else torch.contiguous_format)
        if cfg.model.compile:  # (a sharded teacher gathers its blocks by hooks: left eager)
            compile_blocks(net)
    return Teacher(wide, net, mode, reason, rt)
