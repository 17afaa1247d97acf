"""Shared machinery of the shard writers: rolling tar shards, skip counts, parallel workers, index.

A writer job is split over ``workers`` processes. Worker ``w`` of ``n`` handles the inputs whose
running index ``i`` has ``i % n == w`` and writes its own shards (``<split>-w<w>-<k>.tar``), so
workers never share a file; the parent merges the per-worker reports into ``OUT/index.json``.
"""

from __future__ import annotations

import json
import multiprocessing
import os
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import webdataset as wds
from tqdm import tqdm


class ShardSink:
    """Write samples to ``OUT/<prefix>-<k>.tar``, starting a new shard every ``maxcount`` samples.

    Each shard is written as ``.tmp`` and renamed when complete, so a killed writer never leaves a
    shard that looks finished. ``shards``/``counts`` list what was written, in order.
    """

    def __init__(self, out: Path, prefix: str, maxcount: int):
        self.out, self.prefix, self.maxcount = out, prefix, maxcount
        self.shards: list[str] = []
        self.counts: list[int] = []
        self._tar: wds.TarWriter | None = None
        self._tmp: Path | None = None

    def write(self, sample: dict) -> None:
        if self._tar is None or self.counts[-1] >= self.maxcount:
            self._finish()
            name = f"{self.prefix}-{len(self.shards):05d}.tar"
            self._tmp = self.out / (name + ".tmp")
            # mtime fixed: the same input gives byte-identical shards.
            self._tar = wds.TarWriter(str(self._tmp), mtime=0.0)
            self.shards.append(name)
            self.counts.append(0)
        self._tar.write(sample)
        self.counts[-1] += 1

    def _finish(self) -> None:
        if self._tar is not None:
            self._tar.close()
            self._tmp.replace(self.out / self.shards[-1])
            self._tar = None

    def close(self) -> None:
        self._finish()


def split_report(sinks: dict[str, ShardSink], skipped: dict[str, Counter]) -> dict:
    """One worker's result: per split its shards, their sample counts, and skips by reason."""
    return {split: {"shards": sink.shards, "shard_samples": sink.counts,
                    "skipped_by_reason": dict(skipped.get(split, {}))}
            for split, sink in sinks.items()}


def run_workers(job: Callable[..., dict], args: tuple, workers: int) -> list[dict]:
    """``job(*args, worker, workers)`` for each worker, in processes when ``workers > 1``."""
    if workers <= 1:
        return [job(*args, 0, 1)]
    # spawn, not fork: the parent may hold threads (tokenizers, torch) that fork would copy locked.
    ctx = multiprocessing.get_context("spawn")
    # One progress-bar lock from the parent: bars of several workers do not garble each other,
    # and no child leaves a semaphore behind when the pool ends.
    lock = ctx.RLock()
    tqdm.set_lock(lock)
    with ctx.Pool(workers, initializer=tqdm.set_lock, initargs=(lock,)) as pool:
        return pool.starmap(job, [(*args, w, workers) for w in range(workers)])


def clear_old_shards(out: Path, splits: list[str]) -> None:
    """Remove shards of an earlier run so the index and the folder agree."""
    for split in splits:
        for old in [*out.glob(f"{split}-*.tar"), *out.glob(f"{split}-*.tar.tmp")]:
            old.unlink()


def merge_reports(reports: list[dict], meta: dict) -> dict:
    """The index: ``meta`` + per split the shard list, per-shard counts, totals and skip reasons."""
    index = dict(meta)
    index["splits"] = {}
    for report in reports:
        for split, part in report.items():
            entry = index["splits"].setdefault(
                split, {"shards": [], "shard_samples": [], "samples": 0, "skipped": 0,
                        "skipped_by_reason": Counter()})
            entry["shards"] += part["shards"]
            entry["shard_samples"] += part["shard_samples"]
            entry["samples"] += sum(part["shard_samples"])
            entry["skipped_by_reason"].update(part["skipped_by_reason"])
    for entry in index["splits"].values():
        entry["skipped"] = sum(entry["skipped_by_reason"].values())
        entry["skipped_by_reason"] = dict(sorted(entry["skipped_by_reason"].items()))
    return index


def write_index(out: Path, index: dict) -> None:
    """Write ``OUT/index.json`` atomically."""
    tmp = out / "index.json.tmp"
    tmp.write_text(json.dumps(index, indent=2))
    os.replace(tmp, out / "index.json")
