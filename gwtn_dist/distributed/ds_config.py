"""The DeepSpeed config of a phase, generated from ours (no DeepSpeed import here).

Batch sizes come from ``data.batch_size`` (the global batch) split over the ranks, precision
from ``dist.precision``, the ZeRO stage from the stage being run, clipping from the phase's
``optim.grad_clip``. The optimizer and the learning-rate schedule are not in this dict: they
are built from the phase's ``optim`` and handed to DeepSpeed as objects, so every engine runs
exactly the schedule of the single-process engine. ``dist.deepspeed`` is merged in last.
"""

from __future__ import annotations

import copy


def merge(base: dict, overrides: dict) -> dict:
    """``overrides`` deep-merged into a copy of ``base``."""
    out = copy.deepcopy(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def deepspeed_config(*, micro_batch: int, world_size: int, zero_stage: int, grad_clip: float,
                     bf16: bool, fp16: bool = False, accumulate: int = 1,
                     overrides: dict | None = None) -> dict:
    """The DeepSpeed config dict for one engine: ``micro_batch`` samples per rank and
    micro-step, ``accumulate`` micro-steps per optimizer step."""
    config = {
        "train_batch_size": micro_batch * world_size * accumulate,
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": accumulate,
        "gradient_clipping": grad_clip,
        "zero_optimization": {"stage": zero_stage},
        # Our optimizers are torch's SGD/AdamW (or LAMB at stage 0), which ZeRO partitions
        # like any other.
        "zero_allow_untested_optimizer": True,
        "bf16": {"enabled": bf16},
        "fp16": {"enabled": fp16},  # dynamic loss scaling (DeepSpeed's default)
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }
    return merge(config, overrides or {})
