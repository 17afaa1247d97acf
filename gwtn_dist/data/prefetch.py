"""Training batches made ahead, off the training thread, without losing exact resume.

The training loop knows, when a stage starts, the whole sequence of batches it will ask for:
``(phase_index, step)`` for every step left in every phase. A :class:`Prefetcher` walks that
sequence in a background thread — reading and decoding the shards, shuffling, collating,
augmenting, normalising, and (``host``) casting to the run's dtype and memory format, or
pinning the batch for an asynchronous copy to a GPU — and keeps up to ``depth`` batches ready,
so the training thread only takes the next one. Torch's kernels release the GIL, so the
thread's tensor work overlaps the step's; its Python work (tar reading, webdataset) runs while
the training thread waits on kernels.

Exact resume: the thread reads the source ahead of the loop, so the source's own ``position``
is past the batches trained on. Each batch travels with the position the source had right
after making it, and :attr:`Prefetcher.position` is that of the last batch *taken*: what a
checkpoint saves, the same as without prefetching. Augmentation draws from (seed, phase,
step), not from the order of calls, so a batch made early is the batch made on time.

``depth=0`` makes each batch on the training thread when it is asked for (no thread).

The thread's tensor work runs on one core. Left alone, its first torch op above the
intra-op grain size would start an OpenMP team of its own (``torch.get_num_threads()``
threads), so a 2-core machine ran four compute threads for two cores, and the step's team
waited on a core the data thread held.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterable

import torch

from .batches import TrainBatches


class _Failed:
    """An exception raised in the thread, re-raised on the training thread when it is due."""

    def __init__(self, exc: BaseException):
        self.exc = exc


def pinned(batch):
    """A batch (tensors, tuples or dicts of them) in page-locked memory, so ``.to(cuda,
    non_blocking=True)`` copies it asynchronously."""
    if torch.is_tensor(batch):
        return batch.pin_memory()
    if isinstance(batch, dict):
        return {k: pinned(v) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(pinned(v) for v in batch)
    return batch


class Prefetcher:
    """This rank's batches for ``keys`` (``(phase_index, step)`` in the order the loop asks),
    each ``host(batches.next(*key))``, made up to ``depth`` ahead in a daemon thread.

    position / skipped: the source's position and bad-data counts right after the last batch
    taken with :meth:`next` (what a checkpoint stores). cpu_s: the CPU time the thread that made
    that batch spent on it (``time.thread_time``: reading, decoding, augmenting, ``host``), which
    a loaded machine does not inflate as it does wall time. Call :meth:`close` when done (the loop
    does, also on errors), which stops the thread.
    """

    def __init__(self, batches: TrainBatches, keys: Iterable[tuple[int, int]],
                 host: Callable = lambda batch: batch, depth: int = 2):
        self.batches, self.host, self.depth = batches, host, depth
        self.position = batches.position
        self.skipped = batches.skipped
        self.cpu_s = 0.0
        self._keys = iter(keys)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if depth > 0:
            self._queue: queue.Queue = queue.Queue(maxsize=depth)
            threads = torch.get_num_threads()  # the training thread's
            started = threading.Event()
            self._thread = threading.Thread(target=self._fill, args=(started,),
                                            name="gwtn-prefetch", daemon=True)
            self._thread.start()
            started.wait()
            # torch.set_num_threads also sets the default of threads not yet started; put it
            # back (this thread's own team keeps its size, the prefetch thread keeps one).
            torch.set_num_threads(threads)

    def _make(self, key: tuple[int, int]) -> tuple:
        start = time.thread_time()
        batch = self.host(self.batches.next(*key))
        return (key, batch, self.batches.position, self.batches.skipped,
                time.thread_time() - start)

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _fill(self, started: threading.Event) -> None:
        # This thread only (see the module's docstring). get_num_threads first: torch sizes a
        # thread's team lazily, on its first parallel call, from the process default, which
        # would undo the 1 once the default is put back.
        try:
            torch.get_num_threads()
            torch.set_num_threads(1)
        finally:
            started.set()  # the training thread waits on it: never leave it unset
        try:
            for key in self._keys:
                if not self._put(self._make(key)):
                    return
        except BaseException as exc:  # noqa: BLE001 - handed to the training thread as is
            self._put(_Failed(exc))

    def next(self, phase_index: int, step: int):
        """The batch of ``(phase_index, step)``: it must be the next key of the sequence."""
        if self._thread is None:
            key, batch, self.position, self.skipped, self.cpu_s = self._make(next(self._keys))
        else:
            item = self._queue.get()
            if isinstance(item, _Failed):
                raise item.exc
            key, batch, self.position, self.skipped, self.cpu_s = item
        if key != (phase_index, step):
            raise RuntimeError(f"prefetcher: made the batch of phase {key[0]} step {key[1]}, "
                               f"but the loop asked for phase {phase_index} step {step}")
        return batch

    def close(self) -> None:
        """Stop the thread (it finishes the batch it is making, then exits)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None
