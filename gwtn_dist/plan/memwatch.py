"""A process's resident memory over a stage: its peak, where it stood at marked moments, and a
coarse timeline, read from ``/proc/self/status`` (Linux).

The loop's ``peak_mem_mb`` is ``ru_maxrss`` on CPU: the peak since the process started, and
rank 0's only. A rehearsal runs each stage in its own processes and wants every rank's peak
of that stage, so each rank keeps a :class:`MemoryWatch`: ``VmHWM`` (the kernel's high-water
mark of the resident set, which ``reset_peak`` can restart where the kernel allows it) and a
sampling thread that notes ``VmRSS`` every ``every_s`` seconds, so a peak can be placed in time
(model build, teacher load, the steps, the checkpoint at a phase end, the final evaluation).
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

STATUS = Path("/proc/self/status")


def status_mb(field: str) -> float:
    """``field`` of /proc/self/status (``VmRSS``, ``VmHWM``) in MiB; 0 where it cannot be read
    (not Linux)."""
    try:
        for line in STATUS.read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024  # the kernel gives kB
    except OSError:
        pass
    return 0.0


def reset_peak() -> bool:
    """Restart the kernel's high-water mark at the current resident set (``clear_refs`` 5);
    False where the kernel does not allow it (then ``VmHWM`` stays the process's peak)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


class MemoryWatch:
    """Resident memory of this process from now on: ``mark(name)`` notes it at a moment,
    ``finish()`` returns the record (peak, marks, timeline in MiB; times in seconds from the
    start)."""

    def __init__(self, every_s: float = 0.05, keep: int = 400):
        self.every_s, self.keep = every_s, keep
        self.t0 = time.monotonic()
        self.marks: dict[str, dict] = {}
        self.samples: list[tuple[float, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, name="gwtn-memwatch", daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        while not self._stop.wait(self.every_s):
            self.samples.append((time.monotonic() - self.t0, status_mb("VmRSS")))

    def mark(self, name: str) -> None:
        """Note the resident and peak memory now under ``name``."""
        self.marks[name] = {"t_s": round(time.monotonic() - self.t0, 2),
                            "rss_mb": round(status_mb("VmRSS"), 1),
                            "hwm_mb": round(status_mb("VmHWM"), 1)}

    def finish(self) -> dict:
        """Stop sampling; the record: ``peak_mb`` (VmHWM), the marks, and the timeline thinned
        to at most ``keep`` points (each the largest sample of its stretch, so the peak stays)."""
        self._stop.set()
        self._thread.join()
        self.mark("end")
        stride = max(1, -(-len(self.samples) // self.keep))
        timeline = [max(self.samples[i:i + stride], key=lambda s: s[1])
                    for i in range(0, len(self.samples), stride)]
        return {"peak_mb": round(status_mb("VmHWM"), 1), "marks": self.marks,
                "timeline": [[round(t, 2), round(m, 1)] for t, m in timeline]}


def write_record(record: dict, path: Path) -> None:
    """Write one rank's record as JSON (atomically: a reader never sees half of it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=1))
    tmp.replace(path)
