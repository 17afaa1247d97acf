"""The process's place in the job and the few collectives the stages need.

``setup(cfg)`` (in ``distributed/setup.py``) is called once by the CLI: it reads the launcher's
environment, picks the device, the engine kind and the precision, joins the process group when
there is more than one rank, and returns the ``Runtime`` that the CLI hands to everything that
needs it (the orchestrators, the stages, the engines). ``Runtime()`` is one CPU/GPU process
with plain torch engines, what the tests and a library user pass.

The collectives (``barrier``, ``all_reduce_sum``, ``gather_objects``, ``sum_counts``) depend
only on whether the process group is up, so they stay module functions; what depends on the
rank is a method of the Runtime (``rank0_says``, ``rank0_value``).
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from ..config.schema import Config, ConfigError, optim_sections
from . import peers
from .env import DistEnv

log = logging.getLogger("gwtn")


@dataclass(frozen=True)
class Runtime:
    """This process's place in the job (``env``), and the engine and precision it trains with.

    Made once per process by ``setup`` and passed explicitly; immutable.
    """

    env: DistEnv = field(default_factory=DistEnv)
    engine: str = "torch"  # "torch" or "deepspeed"
    # The dtype of the trained weights, the inputs and the teacher: bf16/fp16 only where
    # DeepSpeed trains a low-precision copy; fp32 under autocast.
    dtype: torch.dtype = torch.float32
    # The forward's autocast dtype (bf16/fp16), None for none: the torch engine's mixed
    # precision, and DeepSpeed's with LAMB (fp32 weights).
    autocast: torch.dtype | None = None
    precision: str = "fp32"  # the resolved dist.precision

    def autocast_context(self, device: torch.device):
        """Where the loss is computed: autocast to ``self.autocast`` on ``device``, or nothing."""
        if self.autocast is None:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=self.autocast)

    @property
    def rank(self) -> int:
        return self.env.rank

    @property
    def world_size(self) -> int:
        return self.env.world_size

    @property
    def is_main(self) -> bool:
        return self.env.rank == 0

    @property
    def distributed(self) -> bool:
        return _joined()

    def rank0_says(self, flag: bool) -> bool:
        """Rank 0's ``flag``, on every rank (one small all-reduce when there are several)."""
        if self.world_size == 1:
            return flag
        return all_reduce_sum(torch.tensor([float(flag and self.is_main)])).item() > 0

    def rank0_value(self, value: float) -> float:
        """Rank 0's ``value``, on every rank (exact for integers below 2**53)."""
        if self.world_size == 1:
            return value
        return all_reduce_sum(torch.tensor([float(value) if self.is_main else 0.0])).item()


def device_for(cfg: Config, env: DistEnv) -> torch.device:
    """cfg.device, with the rank's own GPU (its local rank) when there are several."""
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device: 'cuda' was asked for but torch sees no CUDA device; use "
                          "device=cpu (or auto)")
    if cfg.device == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", env.local_rank % torch.cuda.device_count())


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_precision(cfg: Config, engine: str, device: torch.device) -> str:
    """``dist.precision`` with ``auto`` resolved (bf16 on CUDA, fp32 on CPU), checked against
    the engine and the device."""
    precision = cfg.dist.precision
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    if precision == "fp16" and engine == "deepspeed" and device.type != "cuda":
        raise ConfigError("dist.precision: fp16 under DeepSpeed needs a CUDA GPU (its CPU "
                          "accelerator has no fp16); use bf16 or fp32, or one process")
    return precision


def precision_dtypes(cfg: Config, engine: str,
                     precision: str) -> tuple[torch.dtype, torch.dtype | None]:
    """(dtype of the weights, autocast dtype or None) for ``precision`` under ``engine``.

    The torch engine keeps fp32 weights and autocasts the forward. DeepSpeed trains a
    bf16/fp16 copy, unless a phase uses LAMB: DeepSpeed's mixed-precision and ZeRO optimizers
    hand the optimizer flattened partitions, and LAMB's trust ratio is per parameter, so
    those runs keep fp32 weights at ZeRO stage 0 and autocast like the torch engine.
    """
    low = DTYPES[precision]
    if engine == "torch":
        return torch.float32, (None if precision == "fp32" else low)
    lamb = [key for key, o in optim_sections(cfg) if o.name == "lamb"]
    if not lamb:
        return low, None
    for key in lamb:
        zero_key = "dist.wide_zero_stage" if key.startswith("wide") else \
            "dist.student_zero_stage"
        if getattr(cfg.dist, zero_key.split(".")[1]) != 0:
            raise ConfigError(f"{zero_key}: {key} is lamb, whose trust ratio is per parameter, "
                              f"but ZeRO 1-3 hand the optimizer flat partitions; set it to 0")
    if precision == "fp16":
        raise ConfigError(f"dist.precision: fp16 with LAMB ({lamb[0]}) under DeepSpeed has no "
                          f"loss scaler here; use bf16")
    return torch.float32, (None if precision == "fp32" else low)


def _joined() -> bool:
    """Whether this process is in an initialised process group (several ranks)."""
    return dist.is_available() and dist.is_initialized()


def leave() -> None:
    """Leave the process group, if this process joined one (the CLI, when a command ends)."""
    peers.stop()
    if _joined():
        dist.destroy_process_group()


def barrier() -> None:
    """Wait for every rank (a no-op on one process)."""
    if _joined():
        dist.barrier()


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    """Sum a small tensor over ranks (a no-op on one process); returns a CPU float64 tensor."""
    if not _joined():
        return values.double().cpu()
    buf = values.double().to(_comm_device())
    dist.all_reduce(buf)
    return buf.cpu()


def gather_objects(obj: object) -> list:
    """Every rank's ``obj`` (a small picklable value), in rank order, on every rank."""
    if not _joined():
        return [obj]
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def sum_counts(counts: dict[str, int]) -> dict[str, int]:
    """Per-key sums of small ``{name: count}`` dicts over ranks (keys may differ by rank)."""
    total: dict[str, int] = {}
    for part in gather_objects(dict(counts)):
        for key, n in part.items():
            total[key] = total.get(key, 0) + n
    return total


def _comm_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) \
        if dist.get_backend() == "nccl" else torch.device("cpu")
