"""Units of work that several processes can share: a folder lock, and a loop that runs each
unit once, in dependency order, whichever process gets to it first.

``gwtn compare`` is a set of independent trainings (teachers, tuning points, arms × seeds).
Started twice on one machine (the second with ``resume=true``), both processes walk the same
list: each takes the next unit whose dependencies are done and that nobody holds, so two CPU
cores or two GPUs finish a comparison in about half the time, and a killed worker's unit is
taken over (and resumed from its checkpoint) by the next worker that finds its lock stale.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from .distributed.runtime import Runtime

log = logging.getLogger("gwtn")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class FileLock:
    """An exclusive lock: the file ``path`` created with O_EXCL, holding the holder's host
    and pid. A lock whose holder is a dead process on this host is stale and taken over (with
    a warning)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.held = False

    def holder(self) -> dict | None:
        try:
            return json.loads(self.path.read_text())
        except (FileNotFoundError, ValueError):
            return None

    def busy(self) -> bool:
        """Whether a live process (or one on another host, which cannot be checked) holds it."""
        held = self.holder()
        if held is None:
            return False
        return held.get("host") != socket.gethostname() or _alive(int(held.get("pid", -1)))

    def acquire(self) -> bool:
        """Take the lock if it is free (or stale); False if a live process holds it."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        me = {"host": socket.gethostname(), "pid": os.getpid(), "since": time.time()}
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                held = self.holder()
                if held is None or (held.get("host") == me["host"]
                                    and not _alive(int(held.get("pid", -1)))):
                    log.warning("taking over the stale lock %s (%s)", self.path, held)
                    self.path.unlink(missing_ok=True)
                    continue
                return False
            with os.fdopen(fd, "w") as f:
                f.write(json.dumps(me))
            self.held = True
            return True
        return False

    def release(self) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False


@dataclass
class Unit:
    """One piece of work: ``run()`` makes it finished (``done()`` true) while its worker holds
    the lock file ``lock``; ``needs`` are the names of units that must be done first."""

    name: str
    lock: Path
    run: Callable[[], object]
    done: Callable[[], bool]
    needs: list[str] = field(default_factory=list)


def run_units(rt: Runtime, units: list[Unit], poll_s: float = 5.0) -> None:
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
