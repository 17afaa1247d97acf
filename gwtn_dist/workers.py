"""Units of work that several processes can share: a folder lock, and a loop that runs each
unit once, in dependency order, whichever process gets to it first.

``gwtn compare`` is a set of independent trainings (teachers, tuning points, arms × seeds).
Started twice on one machine (the second with ``resume=true``), both processes walk the same
list: each takes the next unit whose dependencies are done and that nobody holds, so two CPU
cores or two GPUs finish a comparison in about half the time, and a killed worker's unit is
taken over (and resumed from its checkpoint) by the next worker that finds its lock stale.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

log = logging.getLogger("gwtn")


class Ranks(Protocol):
    """What ``run_units`` needs of the job's processes: ``distributed.runtime.Runtime`` is one.
    Declared here so this base utility does not import the distributed layer above it."""

    @property
    def is_main(self) -> bool: ...

    def rank0_says(self, flag: bool) -> bool:
        """Rank 0's ``flag``, on every rank."""
        ...


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class FileLock:
    """An exclusive lock: the file ``path``, holding the holder's host, pid and a token. A lock
    whose holder is a dead process on this host is stale and taken over (with a warning).

    No moment exists at which two processes both hold it: the lock file is made by
    ``os.link`` of a temporary file that already holds the record (atomic, also on NFS, and
    never empty), and a stale lock is replaced by ``os.replace`` (the path never disappears
    while it is taken over), under an ``fcntl.flock`` of ``<path>.guard`` inside which the lock
    is judged stale again, so two processes that both found it stale cannot both take it.
    Takeovers are only ever made by processes on the holder's host (another host's pid cannot
    be checked), which is where flock holds.
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        self.held = False
        self._token = ""

    def holder(self) -> dict | None:
        """The holder's record, or None when there is no lock or it cannot be read."""
        try:
            record = json.loads(self.path.read_text())
        except (FileNotFoundError, ValueError):
            return None
        return record if isinstance(record, dict) else None

    def busy(self) -> bool:
        """Whether a live process (or one on another host, which cannot be checked) holds it."""
        return _live(self.holder())

    def acquire(self) -> bool:
        """Take the lock if it is free (or stale); False if a live process holds it."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        token = f"{socket.gethostname()}-{os.getpid()}-{os.urandom(6).hex()}"
        me = {"host": socket.gethostname(), "pid": os.getpid(), "since": time.time(),
              "token": token}
        tmp = self.path.with_name(f"{self.path.name}.{token}.tmp")
        try:
            try:
                tmp.write_text(json.dumps(me))
            except OSError as exc:  # a full disk: name the lock
                raise OSError(exc.errno, exc.strerror, str(self.path)) from exc
            while True:
                try:
                    os.link(tmp, self.path)  # fails if the lock exists; never half-written
                    break
                except FileExistsError:
                    pass
                if _live(self.holder()):
                    return False
                with self._guard():  # stale or unreadable: judged again, then replaced
                    if not self.path.exists():
                        continue  # released meanwhile: try to create it again
                    held = self.holder()
                    if _live(held):
                        return False  # another process took it over first
                    log.warning("taking over the stale lock %s (%s)", self.path, held)
                    os.replace(tmp, self.path)
                    break
        finally:
            tmp.unlink(missing_ok=True)
        self.held, self._token = True, token
        return True

    @contextlib.contextmanager
    def _guard(self):
        """Hold ``<path>.guard`` (flock) for a takeover; processes that die release it."""
        fd = os.open(self.path.with_name(self.path.name + ".guard"), os.O_RDWR | os.O_CREAT,
                     0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing the descriptor releases the flock

    def release(self) -> None:
        """Give the lock up (only if the file is still this holder's)."""
        if self.held:
            if (self.holder() or {}).get("token") == self._token:
                self.path.unlink(missing_ok=True)
            self.held = False


def _live(held: dict | None) -> bool:
    """Whether the holder of a lock record is alive: a process on this host that exists, or
    one on another host (which cannot be checked). None (no record, or unreadable) is not."""
    if held is None:
        return False
    try:
        pid = int(held.get("pid", -1))
    except (TypeError, ValueError):
        return False
    return held.get("host") != socket.gethostname() or (pid > 0 and _alive(pid))


@dataclass
class Unit:
    """One piece of work: ``run()`` makes it finished (``done()`` true) while its worker holds
    the lock file ``lock``; ``needs`` are the names of units that must be done first."""

    name: str
    lock: Path
    run: Callable[[], object]
    done: Callable[[], bool]
    needs: list[str] = field(default_factory=list)


def run_units(rt: Ranks, units: list[Unit], poll_s: float = 5.0) -> None:
    """Run every unit that is not done, in order where dependencies allow, skipping units held
    by another process; returns when every unit is done (waiting for other workers' units).
    Rank 0 takes a unit's lock for the job's ranks, which run it together."""
    by_name = {u.name: u for u in units}
    waiting_since = None
    while True:
        pending = [u for u in units if not u.done()]
        if not pending:
            return
        ran = False
        for unit in pending:
            if not all(by_name[n].done() for n in unit.needs):
                continue
            lock = FileLock(unit.lock)
            if not rt.rank0_says(rt.is_main and lock.acquire()):
                continue
            try:
                if not unit.done():  # another worker may have finished it meanwhile
                    log.info("unit %s", unit.name)
                    unit.run()
            finally:
                lock.release()
            ran = True
            break
        if ran:
            waiting_since = None
            continue
        if waiting_since is None:
            waiting_since = time.monotonic()
            held = [u.name for u in pending if FileLock(u.lock).holder()]
            log.info("waiting for other workers: %s", ", ".join(held) or "-")
        time.sleep(poll_s)
