"""The engine seam, and the one module that imports DeepSpeed.

Every optimisation step of every stage goes through an engine made by ``make_engine``: a stage
hands it the module being trained, its parameter groups (each with an ``lr_mult``) and the
phase's OptimConfig; the engine owns the optimizer and the schedule and does backward, gradient
all-reduce (DeepSpeed), clipping and the step. One process runs ``TorchEngine``; under a
multi-rank launcher (or ``dist.engine=deepspeed``) ``DeepSpeedEngine`` runs the same optimizer
and schedule inside DeepSpeed with the phase's ZeRO stage. Both are an ``Engine``, the
protocol the training loop is written against. An engine also owns its layout: how a net is
placed for training (``engine_type(rt).place``) and which files of its own a stage checkpoint
holds (``save``/``load``/``prune``/``record``), so the loop and the stages never ask which engine
runs. ``shard_frozen`` turns the frozen wide teacher into a ZeRO-3 engine without optimizer. The
optimizer and the schedule themselves are built in ``gwtn_dist.optim``.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import logging
import os
import pickle
import shutil
import warnings
from datetime import timedelta
from pathlib import Path
from typing import Protocol

import torch
from torch import nn

from ..checkpoint import CheckpointError, atomic_write_text, why_unreadable, write_error
from ..config.schema import DistConfig, OptimConfig
from ..optim import build_optimizer, schedule
from ..profiling import region
from .ds_config import deepspeed_config
from .runtime import Runtime
from .sync_bn import use_global_batchnorm

log = logging.getLogger("gwtn")


class Engine(Protocol):
    """What the training loop uses of a phase's engine (``make_engine`` makes one).

    A step is ``optim.accumulate`` calls of ``backward`` (one per micro-batch) and one
    ``step``; ``save``/``load`` carry its resume state through the stage checkpoint (files of
    its own, if any, under the stage folder: ``prune`` removes those no checkpoint names);
    ``release`` ends the phase. ``place`` (on the class: before there is an engine) readies a
    net for training under it.
    """

    #: Whether ``save`` writes the modules' weights too (then a mid-phase checkpoint need not).
    saves_modules: bool
    #: The DeepSpeed config the engine runs with, recorded per phase; None for none.
    config: dict | None

    @staticmethod
    def place(model: nn.Module, device: torch.device, memory_format: torch.memory_format,
              sync_batchnorm: bool) -> nn.Module:
        """``model`` on ``device``, ready to train under this kind of engine (its layout in
        memory, its batch norms over the global batch if ``sync_batchnorm``)."""
        ...

    @property
    def lr(self) -> float:
        """The current lr of the first parameter group."""
        ...

    def backward(self, loss: torch.Tensor) -> None:
        """Backward of one micro-batch's mean loss."""
        ...

    def step(self, loss: torch.Tensor | None = None, grad_norm: bool = False) -> float | None:
        """(Backward of ``loss`` if given, then) the optimizer step; the gradient norm if
        asked and known, else None."""
        ...

    def save(self, stage_dir: Path, phase_index: int, step: int) -> dict:
        """The resume state after ``step`` of phase ``phase_index``, for the stage checkpoint
        (it may write files of its own under ``stage_dir`` first)."""
        ...

    def load(self, stage_dir: Path, saved: dict) -> None:
        """Restore what ``save`` returned (and wrote)."""
        ...

    def prune(self, stage_dir: Path, mid_phase: bool) -> None:
        """Once the stage checkpoint is written (rank 0): remove the engine's files that neither
        it nor the previous one names (``mid_phase``: the new one names some)."""
        ...

    def record(self, stage_dir: Path, phase: str) -> None:
        """Keep what the engine runs with in phase ``phase`` beside the stage's files (rank 0)."""
        ...

    def module_state(self, module: nn.Module) -> dict:
        """A consolidated CPU state dict of ``module`` (collective under ZeRO)."""
        ...

    def release(self, modules: dict[str, nn.Module]) -> None:
        """End the phase, leaving ``modules`` whole, in fp32, with the trained weights."""
        ...


#: Where a stage's DeepSpeed checkpoints live (``stage_dir/deepspeed/<tag>``), and the file that
#: keeps each phase's generated DeepSpeed config.
DEEPSPEED_DIR = "deepspeed"
DEEPSPEED_CONFIGS = "deepspeed_config.json"


def _tag(phase_index: int, step: int) -> str:
    """The DeepSpeed checkpoint tag of a mid-phase checkpoint: ``phase3-step200``."""
    return f"phase{phase_index}-step{step}"


def _tag_order(name: str) -> tuple[int, int]:
    """``phase3-step200`` → (3, 200): the order in which tags were written."""
    phase, step = name.split("-")
    return int(phase.removeprefix("phase")), int(step.removeprefix("step"))


def _prune_deepspeed_tags(stage_dir: Path, mid_phase: bool) -> None:
    """Remove all but the newest DeepSpeed tags under ``stage_dir``: the two that the new stage
    checkpoint and the previous one may name mid-phase, else one (the previous one's)."""
    folder, keep = stage_dir / DEEPSPEED_DIR, 2 if mid_phase else 1
    if folder.is_dir():
        tags = sorted((d for d in folder.iterdir() if d.is_dir() and d.name.startswith("phase")),
                      key=lambda d: _tag_order(d.name))
        for old in tags[:-keep]:
            shutil.rmtree(old, ignore_errors=True)


def _trainable(groups: list[dict]) -> list[dict]:
    groups = [g for g in groups if g["params"] and g.get("lr_mult", 1.0) > 0]
    if not groups:
        raise ValueError("nothing to train: every parameter group is empty or frozen")
    return groups


def _close_accumulation(engine: TorchEngine | DeepSpeedEngine, loss: torch.Tensor | None) -> None:
    """Before an engine's optimizer step: the backward of ``loss`` if given, then a check that
    every one of the step's ``accumulate`` micro-batches went backward (and a reset)."""
    if loss is not None:
        engine.backward(loss)
    if engine._micro != engine.accumulate:
        raise RuntimeError(f"step after {engine._micro} of {engine.accumulate} micro-batches")
    engine._micro = 0


class TorchEngine:
    """Optimizer + schedule + gradient clipping for one phase, on one process.

    A step is ``optim.accumulate`` calls of ``backward`` (one per micro-batch, gradients
    summed) and one ``step``; ``step(loss)`` is the one-micro-batch shorthand. Under fp16
    autocast (``Runtime.autocast``) a GradScaler scales the loss so small gradients do not
    underflow, and skips the optimizer step when a gradient is inf/NaN (the schedule still
    advances); its state resumes with the engine's.
    """

    saves_modules = False  # its resume state is the optimizer's; the loop saves the weights
    config = None  # no DeepSpeed config to record

    @staticmethod
    def place(model: nn.Module, device: torch.device, memory_format: torch.memory_format,
              sync_batchnorm: bool) -> nn.Module:
        """``model`` on ``device`` in ``memory_format`` (one process: no batch to sync over)."""
        return model.to(device=device, memory_format=memory_format)

    def __init__(self, rt: Runtime, groups: list[dict], optim: OptimConfig, total_steps: int):
        groups = _trainable(groups)
        self.params = [p for g in groups for p in g["params"]]
        self.optim_cfg = optim
        self.accumulate = optim.accumulate
        self._micro = 0  # micro-batches backpropagated in the current step
        self.optimizer = build_optimizer(groups, optim)
        self.scheduler = schedule(self.optimizer, total_steps, optim)
        self.scaler = torch.amp.GradScaler(self.params[0].device.type) \
            if rt.autocast == torch.float16 else None

    @property
    def lr(self) -> float:
        """The current lr of the first group (the part of the net being trained at full rate)."""
        return self.optimizer.param_groups[0]["lr"]

    def backward(self, loss: torch.Tensor) -> None:
        """Backward of one micro-batch's mean loss, weighted 1/accumulate so the summed
        gradients are those of the mean over the step's micro-batches."""
        if self._micro == 0:
            for p in self.params:  # set_to_none, whatever the optimizer's zero_grad takes
                p.grad = None
        with region("backward"):
            if self.accumulate > 1:
                loss = loss / self.accumulate
            (self.scaler.scale(loss) if self.scaler else loss).backward()
        self._micro += 1

    def step(self, loss: torch.Tensor | None = None, grad_norm: bool = False) -> float | None:
        """(Backward of ``loss`` if given,) clip, step; returns the gradient norm (before
        clipping) if asked (one host sync), else None."""
        _close_accumulation(self, loss)
        with region("optimizer"):
            if self.scaler:  # true gradients for clipping and the norm
                self.scaler.unscale_(self.optimizer)
            norm = None
            if self.optim_cfg.grad_clip > 0:
                norm = torch.nn.utils.clip_grad_norm_(self.params, self.optim_cfg.grad_clip)
            elif grad_norm:
                norm = torch.linalg.vector_norm(torch.stack(
                    [torch.linalg.vector_norm(p.grad) for p in self.params
                     if p.grad is not None]))
            if self.scaler:
                self.scaler.step(self.optimizer)  # skipped when a gradient is inf/NaN
                self.scaler.update()
            else:
                self.optimizer.step()
            with warnings.catch_warnings():  # the schedule counts steps, skipped ones too
                warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler")
                self.scheduler.step()
        return float(norm) if grad_norm and norm is not None else None

    def save(self, stage_dir: Path, phase_index: int, step: int) -> dict:
        """The engine's resume state, kept inline in the stage checkpoint (no files)."""
        state = {"optimizer": self.optimizer.state_dict(),
                 "scheduler": self.scheduler.state_dict()}
        if self.scaler:
            state["scaler"] = self.scaler.state_dict()
        return state

    def load(self, stage_dir: Path, saved: dict) -> None:
        """Restore the optimizer, the schedule and the loss scaler from ``saved``."""
        self.optimizer.load_state_dict(saved["optimizer"])
        self.scheduler.load_state_dict(saved["scheduler"])
        if self.scaler and "scaler" in saved:
            self.scaler.load_state_dict(saved["scaler"])

    def prune(self, stage_dir: Path, mid_phase: bool) -> None:
        """It writes no files; DeepSpeed tags an earlier run of this stage left (one stopped
        at a phase end under ``dist.engine=deepspeed``) go as they would under DeepSpeed."""
        _prune_deepspeed_tags(stage_dir, mid_phase)

    def record(self, stage_dir: Path, phase: str) -> None:
        """Nothing to record: the run's config says it all."""

    def module_state(self, module: nn.Module) -> dict:
        """``module``'s state, copied to the CPU."""
        return full_state_dict(module)

    def release(self, modules: dict[str, nn.Module]) -> None:
        """Nothing to do: the modules were trained in place."""


class DeepSpeedEngine:
    """The phase's optimizer and schedule inside a DeepSpeed engine with ZeRO ``zero_stage``.

    ``module`` is what DeepSpeed wraps (all parameters the phase may touch); its forward is not
    used: the stages call the modules themselves, and DeepSpeed's hooks (gradient reduction, and
    under ZeRO-3 parameter gathering) fire on the submodules. Resume state is a DeepSpeed
    checkpoint (every rank writes its partition) under ``ckpt_dir/<tag>``.

    ``micro_batch`` is a rank's batch per step; with ``optim.accumulate`` N DeepSpeed runs N
    micro-batches of micro_batch/N (``gradient_accumulation_steps``), scales each loss by 1/N
    and reduces gradients and steps at the last one.
    """

    def __init__(self, rt: Runtime, module: nn.Module, groups: list[dict], optim: OptimConfig,
                 total_steps: int, zero_stage: int, dist_cfg: DistConfig, micro_batch: int):
        import deepspeed

        groups = _trainable(groups)
        self.accumulate = optim.accumulate
        self._micro = 0
        self.optimizer = build_optimizer(groups, optim)
        scheduler = schedule(self.optimizer, total_steps, optim)
        self.config = deepspeed_config(micro_batch=micro_batch // self.accumulate,
                                       accumulate=self.accumulate, world_size=rt.world_size,
                                       zero_stage=zero_stage, grad_clip=optim.grad_clip,
                                       bf16=rt.dtype == torch.bfloat16,
                                       fp16=rt.dtype == torch.float16,
                                       overrides=dist_cfg.deepspeed)
        # DeepSpeed casts a bf16/fp16 net in place; parameters outside the optimizer (frozen)
        # keep their fp32 values here, for the hand-off.
        low = self.config["bf16"]["enabled"] or self.config["fp16"]["enabled"]
        self._fp32_start = full_state_dict(module) if low else {}
        self.engine, _, _, _ = deepspeed.initialize(
            model=module, optimizer=self.optimizer, lr_scheduler=scheduler, config=self.config
        )

    @property
    def lr(self) -> float:
        """The current lr of the first group."""
        return self.optimizer.param_groups[0]["lr"]

    def backward(self, loss: torch.Tensor) -> None:
        """Backward of one micro-batch's mean loss (DeepSpeed weights it 1/accumulate, and
        reduces gradients at the last micro-batch of the step)."""
        with region("backward"):
            self.engine.backward(loss)
        self._micro += 1
        if self._micro < self.accumulate:
            self.engine.step()  # not a boundary: DeepSpeed only counts the micro-batch

    def step(self, loss: torch.Tensor | None = None, grad_norm: bool = False) -> float | None:
        """(Backward of ``loss`` if given, then) the optimizer step; the global gradient norm
        if asked and DeepSpeed computed one (it does when clipping), else None."""
        _close_accumulation(self, loss)
        with region("optimizer"):
            self.engine.step()
        if not grad_norm:
            return None
        norm = self.engine.get_global_grad_norm()
        return float(norm) if norm is not None else None

    saves_modules = True  # a DeepSpeed checkpoint holds the module weights (partitioned or not)

    @staticmethod
    def place(model: nn.Module, device: torch.device, memory_format: torch.memory_format,
              sync_batchnorm: bool) -> nn.Module:
        """``model`` on ``device``, its batch norms over the global batch if
        ``sync_batchnorm``. Its parameters stay contiguous: DeepSpeed broadcasts and flattens
        them as contiguous storage; the activations (the inputs) still use ``memory_format``,
        which is what decides the conv kernels."""
        if sync_batchnorm:
            model = use_global_batchnorm(model, device)  # on CUDA, a net whose BNs are replaced
        return model.to(device=device)

    def save(self, stage_dir: Path, phase_index: int, step: int) -> dict:
        """Write a DeepSpeed checkpoint under ``stage_dir/deepspeed/phase<i>-step<n>`` (every
        rank its part). A write that fails (a full disk) is an ``OSError`` naming the tag:
        ``checkpoint.pt`` does not point to it yet, so the previous checkpoint stays the one a
        resume reads."""
        ckpt_dir, tag = stage_dir / DEEPSPEED_DIR, _tag(phase_index, step)
        try:
            self.engine.save_checkpoint(str(ckpt_dir), tag=tag, save_latest=False)
        except OSError as exc:
            raise OSError(exc.errno, exc.strerror or str(exc), str(ckpt_dir / tag)) from exc
        except RuntimeError as exc:
            if isinstance(exc, torch.distributed.DistError):
                raise
            raise write_error(ckpt_dir / tag, exc) from exc
        torch.distributed.barrier()
        return {"deepspeed_tag": tag}

    def load(self, stage_dir: Path, saved: dict) -> None:
        """Load the DeepSpeed checkpoint ``saved`` names (every rank its part), every file
        read with ``weights_only=True``: a crafted file in it is a ``CheckpointError``."""
        ckpt_dir, tag = stage_dir / DEEPSPEED_DIR, saved["deepspeed_tag"]
        try:
            with weights_only_loads():
                path, _ = self.engine.load_checkpoint(str(ckpt_dir), tag=tag)
        except torch.distributed.DistError:  # a rank went away: not the checkpoint's fault
            raise
        except (pickle.UnpicklingError, EOFError, RuntimeError, ValueError, KeyError,
                AssertionError) as exc:
            raise CheckpointError(f"DeepSpeed checkpoint {ckpt_dir / tag} cannot be read safely "
                                  f"({why_unreadable(exc)}); it is torn, corrupt, or not "
                                  f"written by gwtn") from exc
        if path is None:
            raise CheckpointError(f"DeepSpeed checkpoint {ckpt_dir / tag} is missing or "
                                  f"incomplete")

    def prune(self, stage_dir: Path, mid_phase: bool) -> None:
        """Remove the DeepSpeed tags that neither stage checkpoint names any more."""
        _prune_deepspeed_tags(stage_dir, mid_phase)

    def record(self, stage_dir: Path, phase: str) -> None:
        """Keep the generated DeepSpeed config of each phase in ``deepspeed_config.json``."""
        path = stage_dir / DEEPSPEED_CONFIGS
        configs = json.loads(path.read_text()) if path.is_file() else {}
        configs[phase] = self.config
        atomic_write_text(path, json.dumps(configs, indent=2))

    def module_state(self, module: nn.Module) -> dict:
        """A consolidated fp32 CPU state of ``module`` (collective): trained parameters come
        from the optimizer's fp32 master weights, so bf16 training hands off full precision."""
        from deepspeed.utils import safe_get_full_fp32_param

        state = {k: v.float() if v.is_floating_point() else v
                 for k, v in full_state_dict(module).items()}
        for name, param in module.named_parameters():
            master = safe_get_full_fp32_param(param)
            if master is not None:
                state[name] = master.detach().float().cpu().clone()
            elif name in self._fp32_start:
                state[name] = self._fp32_start[name]
        return state

    def release(self, modules: dict[str, nn.Module]) -> None:
        """Close the engine and leave ``modules`` whole, in fp32, with the trained weights."""
        states = {name: self.module_state(m) for name, m in modules.items()}
        self.engine.destroy()
        for name, module in modules.items():
            for pname, param in module.named_parameters():  # ZeRO-3 left empty tensors here
                param.data = states[name][pname].to(param.device)
            module.float().load_state_dict(states[name])


FORCE_WEIGHTS_ONLY = "TORCH_FORCE_WEIGHTS_ONLY_LOAD"
FORCE_NO_WEIGHTS_ONLY = "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"


def deepspeed_safe_globals() -> list:
    """The classes DeepSpeed's checkpoint files hold besides tensors and plain containers: the
    ZeRO optimizer state's loss scaler, ZeRO stage and fragment addresses (found with
    ``torch.serialization.get_unsafe_globals_in_checkpoint`` on ZeRO 0-3, fp32 and bf16, sgd,
    adamw and lamb checkpoints; the dynamic scaler is fp16's)."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


@contextlib.contextmanager
def weights_only_loads():
    """Inside, every ``torch.load`` reads with ``weights_only=True``, DeepSpeed's own too (its
    loaders pass ``weights_only=False``; torch's ``TORCH_FORCE_WEIGHTS_ONLY_LOAD`` overrides an
    explicit argument), with DeepSpeed's few classes allowed. A pickle that would run code is an
    ``UnpicklingError`` instead. It sets an environment variable for the whole process: the
    loop's thread is the one that loads torch files (the data threads read tars and arrays)."""
    saved = {name: os.environ.pop(name, None) for name in (FORCE_WEIGHTS_ONLY,
                                                          FORCE_NO_WEIGHTS_ONLY)}
    os.environ[FORCE_WEIGHTS_ONLY] = "1"
    try:
        with torch.serialization.safe_globals(deepspeed_safe_globals()):
            yield
    finally:
        for name, value in saved.items():
            os.environ.pop(name, None)
            if value is not None:
                os.environ[name] = value


def engine_type(rt: Runtime) -> type[TorchEngine | DeepSpeedEngine]:
    """The engine class this process runs; the only place that decides which implementation
    runs (``rt.engine``)."""
    return DeepSpeedEngine if rt.engine == "deepspeed" else TorchEngine


def make_engine(rt: Runtime, module: nn.Module, groups: list[dict], optim: OptimConfig,
                total_steps: int, zero_stage: int = 0, dist_cfg: DistConfig | None = None,
                micro_batch: int = 1) -> Engine:
    """The engine for one phase (of ``engine_type(rt)``). ``micro_batch``: a rank's batch per
    optimizer step (all its micro-batches)."""
    if engine_type(rt) is DeepSpeedEngine:
        return DeepSpeedEngine(rt, module, groups, optim, total_steps, zero_stage,
                               dist_cfg or DistConfig(), micro_batch)
    return TorchEngine(rt, groups, optim, total_steps)


def init_distributed(backend: str, timeout_s: int) -> None:
    """Join the process group through DeepSpeed (it reads the env:// variables)."""
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    if get_accelerator().device_name() == "cpu":
        # DeepSpeed JIT-compiles a C++ shared-memory all-reduce whenever a CPU process group
        # starts (minutes on a busy 2-core machine, again for every venv sharing the build
        # folder); only its inference all-reduce uses it, training never does. Without it
        # DeepSpeed falls back as on a machine where the op cannot be built.
        # (by module path: the package's own name "torch" is torch itself)
        importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False,
                               timeout=timedelta(seconds=timeout_s))


def _is_partitioned(module: nn.Module) -> bool:
    return any(hasattr(p, "ds_id") for p in module.parameters())


@contextlib.contextmanager
def gathered(module: nn.Module):
    """Inside, every parameter of ``module`` is whole on every rank (ZeRO-3 gathers them)."""
    if not _is_partitioned(module):
        yield module
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
        yield module


def full_state_dict(module: nn.Module) -> dict:
    """A consolidated CPU copy of ``module``'s state, whatever ZeRO stage holds it (collective)."""
    with gathered(module):
        return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}


def shard_frozen(rt: Runtime, module: nn.Module, dist_cfg: DistConfig,
                 micro_batch: int) -> nn.Module:
    """Partition a frozen module's parameters over all ranks as a ZeRO-3 engine, no optimizer.

    Returns the engine; calling it runs the module's forward, gathering each submodule's
    parameters just before it runs and releasing them after.
    """
    import deepspeed

    config = deepspeed_config(micro_batch=micro_batch, world_size=rt.world_size, zero_stage=3,
                              grad_clip=0.0, bf16=rt.dtype == torch.bfloat16,
                              fp16=rt.dtype == torch.float16, overrides=dist_cfg.deepspeed)
    engine, _, _, _ = deepspeed.initialize(model=module, config=config)
    engine.eval()
    return engine


def held_bytes(module: nn.Module) -> tuple[int, int]:
    """(bytes of parameters this rank holds, bytes of all parameters) of ``module``."""
    held = total = 0
    for p in module.parameters():
        if hasattr(p, "ds_tensor"):
            held += p.ds_tensor.numel() * p.ds_tensor.element_size()
            total += p.ds_numel * p.ds_tensor.element_size()
        else:
            held += p.numel() * p.element_size()
            total += p.numel() * p.element_size()
    return held, total
