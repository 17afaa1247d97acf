"""Joining the job: ``setup`` makes the process's one ``Runtime`` (engine, device, precision)
and, for DeepSpeed, joins the process group (through ``engines.init_distributed``, the one
place that imports DeepSpeed). Apart from ``runtime.py`` so that the runtime, which the engines
build on, does not import them back.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import tempfile
import warnings

import torch
import torch.distributed as dist

from ..config.schema import Config, ConfigError, optim_sections
from . import peers
from .engines import init_distributed
from .env import DistEnv, discover, export
from .runtime import Runtime, device_for, precision_dtypes, resolve_precision

log = logging.getLogger("gwtn")


def setup(cfg: Config, env: DistEnv | None = None) -> Runtime:
    """Join the job: choose engine and precision, init the process group if needed. The
    returned Runtime is the process's one: the CLI makes it once and hands it on."""
    env = env or discover()
    engine = cfg.dist.engine
    if engine == "auto":
        engine = "deepspeed" if env.world_size > 1 else "torch"
    if engine == "torch" and env.world_size > 1:
        raise ConfigError(f"dist.engine: 'torch' runs one process, but the launcher started "
                          f"{env.world_size} ranks; use 'auto' or 'deepspeed'")
    device = device_for(cfg, env)
    precision = resolve_precision(cfg, engine, device)
    weights, autocast = precision_dtypes(cfg, engine, precision)
    batch = cfg.data.batch_size
    if batch % env.world_size:
        raise ConfigError(f"data.batch_size: the global batch {batch} does not split evenly "
                          f"over {env.world_size} ranks; choose a multiple of {env.world_size}")
    for key, o in optim_sections(cfg):
        if (batch // env.world_size) % o.accumulate:
            raise ConfigError(f"{key}.accumulate: a rank's batch of {batch // env.world_size} "
                              f"does not split into {o.accumulate} equal micro-batches")
    if device.type == "cuda":
        torch.cuda.set_device(device)
        # TF32 tensor cores for fp32 matmuls/convolutions (Ampere and newer).
        torch.backends.cuda.matmul.allow_tf32 = cfg.dist.tf32
        torch.backends.cudnn.allow_tf32 = cfg.dist.tf32
    if engine == "deepspeed" and not dist.is_initialized():
        if device.type == "cpu":  # DeepSpeed's accelerator is chosen when it is first imported
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
        # DeepSpeed calls torch collectives that torch 2.13 marks deprecated, once per call.
        warnings.filterwarnings("ignore", category=FutureWarning,
                                message=r".*is deprecated\. Please use `torch\.distributed")

        export(env)
        backend = cfg.dist.backend
        if backend == "auto":
            backend = "nccl" if device.type == "cuda" else "gloo"
        try:
            with _native_stderr_held():
                init_distributed(backend, cfg.dist.timeout_s)
        except (RuntimeError, TimeoutError) as exc:  # DistNetworkError and gloo's errors
            raise peers.JoinFailed(
                f"rank {env.rank} could not join the job's {env.world_size} ranks at "
                f"{env.master_addr}:{env.master_port} within dist.timeout_s="
                f"{cfg.dist.timeout_s} s: {str(exc).splitlines()[0][:200]}") from exc
        peers.start(env.rank, env.world_size, cfg.dist.timeout_s)
        log.info("rank %d of %d (local %d, launcher %s), backend %s, %s", env.rank,
                 env.world_size, env.local_rank, env.launcher, backend, precision)
    return Runtime(env=env, engine=engine, dtype=weights, autocast=autocast,
                   precision=precision)


@contextlib.contextmanager
def _native_stderr_held():
    """Hold what C++ writes to file descriptor 2 while a rank joins: c10d logs a connection
    that times out with a C++ stack trace of ~40 lines, past Python's logging. Replayed when
    the join succeeds; when it fails, the caller's one line says why and the held text goes
    to the debug log (``-v``)."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 2)
        joined = False
        try:
            yield
            joined = True
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            held.seek(0)
            text = held.read()
            if text and joined:
                os.write(2, text)
            elif text:
                log.debug("while joining: %s", text.decode(errors="replace"))
