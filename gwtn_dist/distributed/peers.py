"""Which ranks are still there: each rank's heartbeat in the job's store, read when a collective
fails, so that the job ends with one line naming the ranks and hosts it lost.

A rank whose host dies (power, network, a kernel panic) sends nothing: its peers wait in their
next collective until ``dist.timeout_s`` passes (gloo raises "Timed out waiting …"), or, when its
processes were killed and the kernel closed their sockets, fail at once ("Connection reset by
peer"). Neither error says which rank went. So every rank of a multi-rank job runs a small
thread that adds 1 to its counter ``gwtn/beat/<rank>`` in the rendezvous store (the TCPStore
at MASTER_ADDR:MASTER_PORT that torch.distributed's env:// rendezvous uses: torchrun's agent
on the first node, or rank 0 under plain srun) every :data:`BEAT_S` seconds. When a collective
fails, :func:`roll_call` reads every counter twice, :data:`ROLL_CALL_S` apart: a rank whose
counter did not move is lost (survivors still beat while they handle the error). If the store
itself cannot be reached, its host is the one lost. Each rank's host name is gathered once at
start, so the line names hosts even when they are gone.

The lowest surviving rank prints the line (the others exit with the same code silently), and the
CLI exits with :data:`EXIT_CODE`. Bounded time: a lost host stops the others after at most
``dist.timeout_s`` plus :data:`ROLL_CALL_S`.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
from dataclasses import dataclass
from datetime import timedelta

import torch.distributed as dist

EXIT_CODE = 69  # EX_UNAVAILABLE: a rank or host of the job is gone
BEAT_S = 0.5
ROLL_CALL_S = 3.0
STORE_TIMEOUT_S = 5.0  # one store read or connect; a store that long silent is lost
# What gloo's (and NCCL's) errors say when a peer is gone: the markers that make a failed
# collective a lost peer rather than a bug.
PEER_FAILURE_MARKERS = ("Timed out waiting", "Connection reset by peer",
                        "Connection closed by peer", "Connection refused", "Broken pipe",
                        "NCCL communicator was aborted",
                        "Watchdog caught collective operation timeout", "gloo/transport")


class JoinFailed(RuntimeError):
    """The process group could not be joined (its rendezvous host unreachable, a rank missing)
    within ``dist.timeout_s``."""


@dataclass
class _State:
    rank: int
    world_size: int
    hosts: list[str]
    addr: str
    port: int
    timeout_s: int
    store: dist.TCPStore | None = None
    thread: threading.Thread | None = None
    stopping: threading.Event | None = None


_state: _State | None = None


def _connect(addr: str, port: int) -> dist.TCPStore:
    return dist.TCPStore(addr, port, is_master=False,
                         timeout=timedelta(seconds=STORE_TIMEOUT_S))


def _beat(state: _State) -> None:
    key = f"gwtn/beat/{state.rank}"
    while not state.stopping.wait(BEAT_S):
        # A store that stops answering shows in the roll call, not here.
        with contextlib.suppress(RuntimeError, TimeoutError, ValueError):
            state.store.add(key, 1)


def start(rank: int, world_size: int, timeout_s: int) -> None:
    """Join the heartbeat (every rank, right after the process group is up; collective: the
    ranks' host names are gathered here)."""
    global _state
    hosts: list = [None] * world_size
    dist.all_gather_object(hosts, socket.gethostname())
    addr, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    state = _State(rank, world_size, hosts, addr, port, timeout_s)
    try:
        state.store = _connect(addr, port)
    except (RuntimeError, TimeoutError, ValueError):
        _state = state  # no heartbeat: a failure is then reported without the roll call
        return
    state.stopping = threading.Event()
    state.thread = threading.Thread(target=_beat, args=(state,), name="gwtn-heartbeat",
                                    daemon=True)
    state.thread.start()
    _state = state


def stop() -> None:
    """Leave the heartbeat (when the process group is torn down)."""
    global _state
    if _state is not None and _state.thread is not None:
        _state.stopping.set()
        _state.thread.join(timeout=STORE_TIMEOUT_S + 1)
    _state = None


def is_peer_failure(exc: BaseException) -> bool:
    """Whether ``exc`` is a collective that failed because a peer went away."""
    if _state is None or _state.world_size < 2:
        return False
    if isinstance(exc, getattr(dist, "DistNetworkError", ())):
        return True
    return isinstance(exc, RuntimeError) and any(m in str(exc) for m in PEER_FAILURE_MARKERS)


def _counts(store: dist.TCPStore, world_size: int) -> list[int]:
    return [store.add(f"gwtn/beat/{r}", 0) for r in range(world_size)]


def roll_call() -> list[int] | None:
    """The ranks that stopped beating (this one excluded); None when the store is lost too."""
    state = _state
    if state is None or state.store is None:
        return []
    try:
        store = _connect(state.addr, state.port)  # the beat thread's may be mid-operation
        before = _counts(store, state.world_size)
        time.sleep(ROLL_CALL_S)
        after = _counts(store, state.world_size)
    except (RuntimeError, TimeoutError, ValueError):
        return None
    return [r for r in range(state.world_size) if r != state.rank and after[r] == before[r]]


def _ranks_on_hosts(ranks: list[int], hosts: list[str]) -> str:
    by_host: dict[str, list[int]] = {}
    for r in ranks:
        by_host.setdefault(hosts[r], []).append(r)
    return "; ".join(f"rank{'s' if len(rs) > 1 else ''} {', '.join(map(str, rs))} on {host}"
                     for host, rs in by_host.items())


def explain(exc: BaseException) -> str | None:
    """The one line for a failed collective, or None where another surviving rank (a lower
    one) prints it. Takes :data:`ROLL_CALL_S` (the roll call)."""
    state = _state
    how = (f"no answer within dist.timeout_s={state.timeout_s} s" if "Timed out" in str(exc)
           else "its connection closed")
    lost = roll_call()
    if lost is None:
        # The store lives on the rendezvous host: its ranks are the ones gone.
        host = state.addr
        lost = [r for r in range(state.world_size)
                if state.hosts[r].split(".")[0] == host.split(".")[0] and r != state.rank]
        gone = (f"lost the rendezvous host {host} (its store at {host}:{state.port} does not "
                f"answer): {how}")
        if lost:
            gone += f"; with it {_ranks_on_hosts(lost, state.hosts)}"
    elif lost:
        gone = f"lost {_ranks_on_hosts(lost, state.hosts)}: {how}"
    else:
        return (f"a collective failed on rank {state.rank} ({state.hosts[state.rank]}) while "
                f"every rank still answers: {str(exc).splitlines()[0][:300]}")
    survivors = [r for r in range(state.world_size) if r not in lost]
    if state.rank != min(survivors, default=state.rank):
        return None
    return (f"{gone}; the job stops (exit {EXIT_CODE}); checkpoints already written are intact: "
            f"restart on every host with resume=true")
