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


# More nodes than any SLURM cluster has: a range past it is a typo (gpu[0-3000000] would print
# millions of lines), not an allocation.
MAX_NODES = 65_536
# A host name as DNS (RFC 1123) and SLURM's NodeName accept it: dot-separated labels of
# letters, digits, '-' and '_' (SLURM allows '_'), 1-63 characters each, 253 in all.
_LABEL = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?")


def check_hostname(name: str, hostlist: str | None = None) -> str:
    """``name`` if it is a host name SLURM and DNS accept, else a LaunchError (a newline or a
    space would add a line to a hostfile or an argument to a command)."""
    if len(name) > 253 or not all(_LABEL.fullmatch(label) for label in name.split(".")):
        where = f" in the host list {hostlist!r}" if hostlist not in (None, name) else ""
        raise LaunchError(f"{name!r}{where} is not a host name (letters, digits, '-', '_' and "
                          f"'.', labels of 1-63 characters)")
    return name


def _split_items(hostlist: str) -> list[str]:
    """``"a[1-2],b"`` → ``["a[1-2]", "b"]``: commas outside brackets; brackets balanced, not
    nested."""
    items, depth, start = [], 0, 0
    for i, char in enumerate(hostlist):
        if char == "[":
            depth += 1
        elif char == "]":
            depth -= 1
        elif char == "," and depth == 0:
            items.append(hostlist[start:i])
            start = i + 1
        if depth not in (0, 1):
            raise LaunchError(f"host list {hostlist!r}: brackets nested or closed before "
                              f"opened")
    if depth:
        raise LaunchError(f"host list {hostlist!r}: a '[' is never closed")
    items.append(hostlist[start:])
    if any(not item for item in items):
        raise LaunchError(f"host list {hostlist!r}: an empty name" + (" between commas" if
                                                                      hostlist else ""))
    return items


def expand_hostlist(hostlist: str, limit: int = MAX_NODES) -> list[str]:
    """SLURM's compressed host list → host names: ``"gpu[01-03,7],cpu9"`` → 5 names. Every
    name is checked (``check_hostname``); ranges must run upwards; at most ``limit`` names."""
    hosts: list[str] = []
    for item in _split_items(hostlist):
        match = re.fullmatch(r"([^\[]*)\[([^\]]*)\](.*)", item)
        if not match:
            hosts.append(check_hostname(item, hostlist))
            continue
        prefix, ranges, suffix = match.groups()
        if not ranges:
            raise LaunchError(f"host list {hostlist!r}: empty brackets (give numbers, e.g. "
                              f"[01-04])")
        for part in ranges.split(","):
            numbers = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
            if not numbers:
                raise LaunchError(f"host list {hostlist!r}: [{ranges}] holds {part!r}, not a "
                                  f"number or a range of numbers like 01-04")
            lo, hi = int(numbers[1]), int(numbers[2] or numbers[1])
            if hi < lo:
                raise LaunchError(f"host list {hostlist!r}: the range {part} runs backwards")
            if len(hosts) + hi - lo + 1 > limit:
                raise LaunchError(f"host list {hostlist!r}: more than {limit:,} nodes")
            width = len(numbers[1])
            for n in range(lo, hi + 1):
                hosts.extend(expand_hostlist(f"{prefix}{n:0{width}d}{suffix}",
                                             limit - len(hosts)))
    if len(hosts) > limit:
        raise LaunchError(f"host list {hostlist!r}: more than {limit:,} nodes")
    return hosts


def rendezvous_port(environ: Mapping[str, str] = os.environ) -> int:
    """MASTER_PORT if set, else a port derived from the SLURM job id, so every node of the job
    (and a launcher that starts them) picks the same one without talking to the others."""
    if "MASTER_PORT" in environ:
        return check_port(_int(environ, "MASTER_PORT"), "MASTER_PORT")
    return 20000 + (_int(environ, "SLURM_JOB_ID") if environ.get("SLURM_JOB_ID") else 0) % 20000


def check_port(port: int, what: str) -> int:
    """``port`` if it is a TCP port a rendezvous can listen on (1-65535), else a LaunchError."""
    if not 1 <= port <= 65535:
        raise LaunchError(f"{what} {port} is not a TCP port (1-65535)")
    return port


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
