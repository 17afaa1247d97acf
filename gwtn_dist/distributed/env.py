"""Who am I in the job: rank, local rank and world size from the launcher's environment.

Launchers and what they set:
- ``torchrun`` and ``deepspeed``: RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE (deepspeed may
  leave the last out), MASTER_ADDR, MASTER_PORT.
- ``srun`` (one task per rank): SLURM_PROCID, SLURM_LOCALID, SLURM_NTASKS,
  SLURM_STEP_NODELIST / SLURM_JOB_NODELIST; the rendezvous is the first node of the step, on a
  port derived from the job id unless MASTER_PORT is set.
- nothing: one process, rank 0 of 1.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass


class LaunchError(RuntimeError):
    """The launcher's environment is incomplete or contradicts itself."""


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    local_world_size: int = 1
    launcher: str = "none"
    master_addr: str = "127.0.0.1"
    master_port: int = 29500

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def expand_hostlist(hostlist: str) -> list[str]:
    """SLURM's compressed host list → host names: ``"gpu[01-03,7],cpu9"`` → 5 names."""
    hosts: list[str] = []
    # Split on commas that are not inside brackets.
    for item in re.findall(r"[^,\[]+(?:\[[^\]]*\][^,\[]*)*", hostlist):
        match = re.fullmatch(r"([^\[]*)\[([^\]]*)\](.*)", item)
        if not match:
            hosts.append(item)
            continue
        prefix, ranges, suffix = match.groups()
        for part in ranges.split(","):
            lo, _, hi = part.partition("-")
            width = len(lo)
            for n in range(int(lo), int(hi or lo) + 1):
                hosts.extend(expand_hostlist(f"{prefix}{n:0{width}d}{suffix}"))
    return hosts


def rendezvous_port(environ: Mapping[str, str] = os.environ) -> int:
    """MASTER_PORT if set, else a port derived from the SLURM job id, so every node of the job
    (and a launcher that starts them) picks the same one without talking to the others."""
    if "MASTER_PORT" in environ:
        return _int(environ, "MASTER_PORT")
    return 20000 + int(environ.get("SLURM_JOB_ID", "0")) % 20000


def _int(environ: Mapping[str, str], key: str) -> int:
    try:
        return int(environ[key])
    except ValueError as exc:
        raise LaunchError(f"{key}={environ[key]!r} is not an integer") from exc


def discover(environ: Mapping[str, str] = os.environ) -> DistEnv:
    """Read the rank layout from the launcher's variables (see the module docstring)."""
    if "RANK" in environ and "WORLD_SIZE" in environ:
        launcher = "torchrun" if "TORCHELASTIC_RUN_ID" in environ else "env"
        world = _int(environ, "WORLD_SIZE")
        local_world = _int(environ, "LOCAL_WORLD_SIZE") if "LOCAL_WORLD_SIZE" in environ \
            else world
        env = DistEnv(rank=_int(environ, "RANK"),
                      local_rank=_int(environ, "LOCAL_RANK") if "LOCAL_RANK" in environ else 0,
                      world_size=world, local_world_size=local_world, launcher=launcher,
                      master_addr=environ.get("MASTER_ADDR", "127.0.0.1"),
                      master_port=_int(environ, "MASTER_PORT") if "MASTER_PORT" in environ
                      else 29500)
    elif "SLURM_PROCID" in environ and "SLURM_NTASKS" in environ:
        nodes = expand_hostlist(environ.get("SLURM_STEP_NODELIST")
                                or environ.get("SLURM_JOB_NODELIST", "127.0.0.1"))
        world = _int(environ, "SLURM_NTASKS")
        port = rendezvous_port(environ)
        per_node = environ.get("SLURM_STEP_TASKS_PER_NODE") or environ.get(
            "SLURM_TASKS_PER_NODE", str(world))
        env = DistEnv(rank=_int(environ, "SLURM_PROCID"),
                      local_rank=_int(environ, "SLURM_LOCALID") if "SLURM_LOCALID" in environ
                      else 0,
                      world_size=world, local_world_size=int(re.match(r"\d+", per_node)[0]),
                      launcher="srun", master_addr=environ.get("MASTER_ADDR", nodes[0]),
                      master_port=port)
    else:
        return DistEnv()
    if not 0 <= env.rank < env.world_size or not 0 <= env.local_rank < env.local_world_size:
        raise LaunchError(f"inconsistent launch environment: rank {env.rank}, local rank "
                          f"{env.local_rank}, world size {env.world_size}, local world size "
                          f"{env.local_world_size}")
    return env


def export(env: DistEnv) -> None:
    """Set the variables torch.distributed's ``env://`` rendezvous reads (for srun, say)."""
    os.environ.update({"RANK": str(env.rank), "LOCAL_RANK": str(env.local_rank),
                       "WORLD_SIZE": str(env.world_size),
                       "LOCAL_WORLD_SIZE": str(env.local_world_size),
                       "MASTER_ADDR": env.master_addr, "MASTER_PORT": str(env.master_port)})
