"""The one shard reader: multi-rank, multi-worker, with exact epochs and exact resume.

A split is a list of shards with known sample counts (from ``index.json``, or counted from the
tar headers when a glob/brace pattern is given). Training splits are shared out one of two ways:

- **per rank** (image folders, token shards): epoch ``e`` shuffles the shards with a seed from
  (seed, e) and lays them end to end; rank ``r`` of ``W`` gets the contiguous ``r``-th ``1/W`` of
  the sample positions, and its logical worker ``j`` of ``K`` the ``j``-th ``1/K`` of that.
  Ranges may start and end inside shards, so more ranks than shards, or uneven shards, leave no
  rank dry. A worker shuffles its range through a seeded buffer and yields
  ``q = N // (W·K) // batch_size`` batches, the same number on every rank and worker (the
  remainder, < W·K·batch_size samples, changes each epoch). A rank's batches interleave its
  workers: rank batch ``b`` is worker ``b % K``'s batch ``b // K``, which is the order a torch
  DataLoader returns them in.
- **one global stream** (``global_batch=True``; Fashion-MNIST's ``npy`` shards): every rank reads
  the same epoch and the caller takes its rank's slice of each batch, so N ranks × b see exactly
  what one rank × N·b sees. Epoch ``e`` shuffles the shard order, then the samples through a
  seeded buffer (webdataset's ``shuffle``, seeds from (seed, e): the order Fashion-MNIST's
  published numbers were measured with). Samples can be selected by index (below a bound, not in
  an excluded set: the validation split), and whole tars kept in memory for the process
  (``tar_cache``): a small training set is re-read every few dozen steps.

**Eval** (per rank): no shuffling; the positions ``0 … N`` are split into ``W·K`` contiguous
slots, so every sample is read exactly once across all ranks and workers; the last batch of a
worker may be short.

Resume: a position ``{"epoch", "batch"}`` is the next batch of the rank. Seeking restarts the
epoch. Per rank, each worker skips its batches before the position by reading raw tar members (no
decode), and worker ids are rotated so the DataLoader's first worker is the one that owns batch
``b``; that is exact as long as the skipped batches held no undecodable sample (the writers check
every image), and needs the same seed, world size, worker count and batch size. The global
stream replays its epoch up to the position, decoding, so it is exact past bad samples too.
Neither counts twice what it meets again before the position (a damaged tar): the position
already holds it. Random augmentation and masking draw from a generator seeded by
(seed, epoch, rank, worker, batch) (the global stream's caller: by (seed, phase, step)), so
skipped batches cost no random state and a resumed batch is bit-identical.

Bad data — an unreadable or truncated tar, a member that does not decode — is skipped, logged
and counted, never a crash. Every batch travels with the skips its worker met since the batch
before (``ShardStream`` yields ``(batch, skipped)``), so :class:`ShardLoader.skipped` holds the
counts of every worker of this rank, and a checkpoint's ``position`` keeps them across a resume.
A shard pattern that matches nothing raises :class:`DataSourceError` with the pattern.

Every tar of an indexed folder is read to the sample count ``index.json`` records for it:
Python's ``tarfile`` takes a bad header after the start (garbage written into the middle) for
the end of the archive, so a tar that ends early is counted as damage (``short tar``, and the
samples it lacks as ``missing samples``) whether or not an error was raised. A tar that goes on
past its count is another shard's or a rewritten one: :class:`DamagedDataError`. An evaluation
stream refuses to score over fewer samples than its share of the index (a lost or undecodable
sample is a ``DamagedDataError`` naming the tar) unless ``eval_missing_ok`` tolerates a fraction.
"""

from __future__ import annotations

import glob
import itertools
import json
import logging
import os
import random
import tarfile
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path

import braceexpand
import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from . import image_transforms as T
from . import npy, remote
from .errors import DamagedDataError, DataSourceError
from .mlm import mask_tokens

log = logging.getLogger("gwtn")
Sample = dict[str, bytes]
Piece = tuple[int, int, int]  # (shard number, first sample, end sample) inside one shard


def count_samples(url: str, skipped: Counter) -> int:
    """Samples in a tar shard, from its member names alone (data is seeked over, not read).

    A damaged tar counts only the samples before the damage (the one it cuts is left out), and
    adds ``unreadable tar`` or ``truncated tar`` to ``skipped``.
    """
    keys, last = 0, None
    try:
        with remote.open_tar(url, skipped) as tf:
            for member in tf:
                key = member.name.split(".", 1)[0]
                if member.isfile() and key != last:
                    keys, last = keys + 1, key
    except remote.NOT_DAMAGE:
        raise
    except (tarfile.TarError, OSError, EOFError) as exc:
        reason = "truncated tar" if keys else "unreadable tar"
        skipped[reason] += 1
        log.warning("%s: %s, %d sample(s) before the damage are used (%s)", url, reason,
                    max(keys - 1, 0), exc)
        return max(keys - 1, 0)
    return keys


def read_index(folder: str | Path) -> dict:
    """The index.json of a shard folder (local or at a URL), checked to be a shard index (a
    ``DamagedDataError`` naming the file when it is not), with an error that says how to make
    one when absent."""
    if remote.is_url(folder):
        path = remote.join(str(folder), "index.json")
        raw = remote.read_bytes(path)
    else:
        path = Path(folder) / "index.json"
        if not path.is_file():
            raise DataSourceError(f"{path} not found: write the shards first with `gwtn shards …` "
                                  f"(e.g. `gwtn shards fashion-mnist {folder}`)")
        try:
            raw = path.read_bytes()
        except OSError as exc:
            raise DamagedDataError(f"{path} cannot be read ({exc})") from None
    try:
        index = json.loads(raw.decode("utf-8"))
    except ValueError as exc:  # UnicodeDecodeError and JSONDecodeError included
        raise DamagedDataError(f"{path} is not valid JSON ({exc}); write the shards again with "
                               f"`gwtn shards …`") from None
    problem = index_problem(index)
    if problem:
        raise DamagedDataError(f"{path} is not a shard index: {problem}; write the shards "
                               f"again with `gwtn shards …`")
    return index


def plain_file_name(name: object) -> bool:
    """Whether ``name`` names a file inside its folder (no path, no ``..``)."""
    return isinstance(name, str) and name not in ("", ".", "..") and "/" not in name \
        and "\\" not in name and "\0" not in name


def _counts(value: object) -> bool:
    return isinstance(value, list) and all(
        isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value)


def index_problem(index: object) -> str | None:
    """What makes ``index`` (a parsed index.json) unusable as a shard index, or None: every
    split lists its shards by plain file names, one sample count per shard, and labels (when
    given) as integers."""
    if not isinstance(index, dict) or not isinstance(index.get("splits"), dict):
        return "expected an object with \"splits\""
    for split, info in index["splits"].items():
        if not isinstance(info, dict) or not isinstance(info.get("shards"), list):
            return f"split {split!r} lists no shards"
        for name in info["shards"]:
            if not plain_file_name(name):
                return f"split {split!r} names the shard {name!r}, not a file in the folder"
        counts = info.get("shard_samples")
        if not _counts(counts) or len(counts) != len(info["shards"]):
            return f"split {split!r} has no sample count (shard_samples) for each shard"
        if "labels" in info and not _counts(info["labels"]):
            return f"split {split!r} has labels that are not class numbers"
    return None


def indexed_shards(folder: str | Path, split: str) -> tuple[list[str], dict]:
    """(paths of ``split``'s shards, the split's entry of index.json), every listed tar
    present."""
    index = read_index(folder)
    if split not in index["splits"]:
        raise DataSourceError(f"{folder}: no {split!r} split in index.json")
    info = index["splits"][split]
    if remote.is_url(folder):  # a missing tar is found when it is read
        return [remote.join(str(folder), name) for name in info["shards"]], info
    urls = [str(Path(folder) / name) for name in info["shards"]]
    missing = [u for u in urls if not Path(u).is_file()]
    if missing:
        raise DataSourceError(f"{folder}: shards listed in index.json are missing: {missing}")
    return urls, info


def resolve_shards(source: str | Path, split: str,
                   skipped: Counter | None = None) -> tuple[list[str], list[int]]:
    """(urls, sample counts) of ``split``: from ``source/index.json`` when ``source`` is a folder,
    else ``source`` is a glob or brace pattern of tar files (``data/train-{000..099}.tar``),
    counted from their headers (damaged ones are added to ``skipped``)."""
    source = str(source)
    if Path(source).is_dir() or (remote.is_url(source) and remote.is_folder(source)):
        urls, info = indexed_shards(source, split)
        return urls, list(info["shard_samples"])
    if remote.is_url(source):
        urls = remote.expand(source)
    else:
        urls = sorted({u for pat in braceexpand.braceexpand(source) for u in glob.glob(pat)})
    if not urls:
        raise DataSourceError(f"no shard files match the pattern {source!r}")
    skipped = Counter() if skipped is None else skipped
    return urls, [count_samples(url, skipped) for url in urls]


def plan(counts: list[int], order: list[int], start: int, stop: int) -> list[Piece]:
    """The pieces of shards that hold positions ``start … stop`` of the shards laid end to end
    in ``order``."""
    pieces, offset = [], 0
    for shard in order:
        lo, hi = max(start, offset), min(stop, offset + counts[shard])
        if lo < hi:
            pieces.append((shard, lo - offset, hi - offset))
        offset += counts[shard]
    return pieces


def read_piece(url: str, first: int, end: int, skipped: Counter,
               count: int | None = None) -> Iterator[Sample]:
    """Samples ``first … end`` of a tar shard as ``{"__key__": key, ext: bytes}``.

    Members before ``first`` are seeked over. A tar that cannot be opened or ends early is
    logged and counted; the samples read before the damage are kept. ``count``: the shard's
    sample count by its index (None: not known, a pattern's tars). With it, a tar that ends
    before sample ``end`` without an error (a bad header, which ``tarfile`` takes for the end
    of the archive) counts as a ``short tar``, every sample short of ``end`` as ``missing
    samples``, and a tar with a sample past ``count`` is a :class:`DamagedDataError`.
    """
    index, key, sample, yielded = -1, None, {}, 0
    reason, error = None, None
    try:
        with remote.open_tar(url, skipped) as tf:
            for member in tf:
                if not member.isfile():
                    continue
                name, _, ext = member.name.partition(".")
                if name != key:
                    if first <= index < end:
                        yielded += 1
                        yield sample
                    index, key, sample = index + 1, name, {"__key__": name}
                    if index >= end:
                        if count is not None and index >= count:
                            raise DamagedDataError(
                                f"{url} holds more than the {count} samples its index lists "
                                f"(sample {name!r} is past them): it is another shard's tar or "
                                f"was rewritten; write the shards again")
                        return
                if index >= first:
                    sample[ext] = tf.extractfile(member).read()
            if first <= index < end:
                yielded += 1
                yield sample
    except remote.NOT_DAMAGE:
        raise
    except (tarfile.TarError, OSError, EOFError) as exc:
        if isinstance(exc, DataSourceError):
            raise
        reason, error = ("unreadable tar" if index < 0 else "truncated tar"), exc
    missing = end - first - yielded if count is not None else 0
    if reason is None and missing > 0:
        reason, error = "short tar", f"it ends after {index + 1} of its {count} samples"
    if reason is None:
        return
    skipped[reason] += 1
    if missing > 0:
        skipped["missing samples"] += missing
    log.warning("%s: %s, skipped from sample %d on (%s)%s", url, reason, max(index, 0), error,
                f"; {missing} sample(s) of its index missing" if missing > 0 else "")


# Whole tars read without error are kept in memory for the process when a stream asks
# (``tar_cache``), keyed by (path, size, mtime): a small training set is re-read every epoch (5k
# Fashion-MNIST images: an epoch every 39 steps), and reading and untarring the same file again
# cost more than the step's data work. Bounded, so a large dataset streams from disk as before;
# off for the per-rank streams, whose DataLoader workers would each hold a copy. The prefetch
# thread and an evaluation on the training thread may read at once, hence the lock.
TAR_CACHE_BYTES = 1 << 30
_tar_cache: dict[tuple[str, int, int], tuple[int, list[Sample]]] = {}  # key → (bytes, samples)
_tar_cache_lock = threading.Lock()


def _tar_key(url: str) -> tuple[str, int, int] | None:
    if remote.is_url(url):
        return url, 0, 0
    try:
        st = os.stat(url)
    except OSError:
        return None
    return url, st.st_size, st.st_mtime_ns


def read_whole_tar(url: str, skipped: Counter, cache: bool,
                   count: int | None = None) -> Iterator[Sample]:
    """Every sample of a tar shard (``read_piece`` from its start to its end, checked against
    its index's ``count`` when given); with ``cache``,
    from memory when this file was read whole before. A tar is kept only once read to its end
    with nothing added to ``skipped`` and only if it fits, so a damaged tar is read (and its bad
    data counted) again on every pass, and a tar that cannot be kept is not held while read."""
    key = _tar_key(url) if cache else None
    with _tar_cache_lock:
        cached = _tar_cache.get(key) if key else None
    if cached is not None:
        yield from cached[1]  # nothing downstream edits a sample
        return
    before = sum(skipped.values())
    with _tar_cache_lock:
        room = TAR_CACHE_BYTES - sum(used for used, _ in _tar_cache.values()) if key else 0
    kept: list[Sample] | None = [] if room > 0 else None
    size = 0
    for sample in read_piece(url, 0, (1 << 62) if count is None else count, skipped, count):
        if kept is not None:
            size += sum(len(v) for v in sample.values() if isinstance(v, bytes))
            kept.append(sample)
            if size > room:
                kept = None  # will not fit: stop holding it
        yield sample
    if kept is None or sum(skipped.values()) != before:
        return
    with _tar_cache_lock:
        for old in [k for k in _tar_cache if k[0] == url]:  # a rewritten shard
            del _tar_cache[old]
        if sum(used for used, _ in _tar_cache.values()) + size <= TAR_CACHE_BYTES:
            _tar_cache[key] = (size, kept)


def of_split(url: str, samples: Iterator[Sample], split: str) -> Iterator[Sample]:
    """``samples`` of the tar ``url``, checked to be ``split``'s (keys ``"<split>-<index>"``,
    as ``gwtn shards fashion-mnist`` writes them): a tar of another split is a
    :class:`DamagedDataError` (a test tar in place of a training one would be trained on)."""
    for sample in samples:
        sample_index(sample)  # keys without an index: not written by `gwtn shards`
        if sample["__key__"].rsplit("-", 1)[0] != split:
            raise DamagedDataError(f"{url} holds {sample['__key__']!r}, a sample of another split "
                                   f"than {split!r}: the tar was swapped for another's or "
                                   f"rewritten; write the shards again")
        yield sample


def sample_index(sample: Sample) -> int:
    """The index a shard writer put in a sample's key (``"<split>-<index>"``)."""
    key = sample["__key__"]
    try:
        return int(key.rsplit("-", 1)[1])
    except (IndexError, ValueError):
        raise DataSourceError(f"sample key {key!r} has no index (\"<split>-<index>\"): these "
                              f"shards were not written by `gwtn shards`") from None


def shards_below(counts: list[int], bound: int) -> int:
    """How many leading shards hold indices below ``bound`` (shards hold consecutive indices
    in order, so the rest would only be filtered away)."""
    starts = np.cumsum([0, *counts[:-1]])
    return int(np.count_nonzero(starts < bound))


def buffer_shuffle(samples: Iterator, size: int, rng: random.Random) -> Iterator:
    """Shuffle a stream through a buffer of ``size`` items (1 = keep the order)."""
    buf: list = []
    for s in samples:
        if len(buf) < size:
            buf.append(s)
            continue
        i = rng.randrange(size)
        buf[i], s = s, buf[i]
        yield s
    rng.shuffle(buf)
    yield from buf


def _seed(*parts: int) -> int:
    return int(np.random.SeedSequence(list(parts)).generate_state(1)[0])


class ShardStream(IterableDataset):
    """One rank's batches of a shard split; iterate it through :class:`ShardLoader`.

    ``decode(sample, rng)`` turns a raw sample into an item (raising ``ValueError``/``OSError``/
    ``KeyError`` on bad data, which is then skipped and counted) and ``collate(items, rng)`` makes
    a batch; ``rng`` is a numpy Generator seeded by (seed, epoch, rank, worker, batch), or None
    for the global stream (its caller draws augmentation from (seed, phase, step)).

    global_batch: one training stream for every rank (the module docstring); ``rank`` and
    ``world_size`` stay 0 and 1 and the caller slices. Only then may samples be selected by
    index: ``below`` (0 = no bound) and ``exclude``; and ``tar_cache`` keep whole tars in memory.
    Its samples' keys must name ``split`` (``of_split``).

    eval_missing_ok: the fraction of an evaluation worker's share that may be lost to damaged
    tars or undecodable samples before the stream refuses (a ``DamagedDataError`` naming the
    tar); 0: none may be.
    """

    def __init__(self, source: str | Path, split: str, *, batch_size: int,
                 decode: Callable[[Sample, np.random.Generator | None], object],
                 collate: Callable[[list, np.random.Generator | None], object], train: bool,
                 rank: int = 0, world_size: int = 1, seed: int = 0, shuffle_buffer: int = 1000,
                 global_batch: bool = False, below: int = 0,
                 exclude: frozenset[int] = frozenset(), tar_cache: bool = False,
                 eval_missing_ok: float = 0.0):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in 0 … world_size-1 = {world_size - 1}")
        if (below or exclude or tar_cache) and not global_batch:
            raise ValueError("below, exclude and tar_cache belong to the global stream")
        self.skipped: Counter = Counter()
        self.urls, self.counts = resolve_shards(source, split, self.skipped)
        # Counts from index.json are checked while reading; a pattern's come from the headers.
        self.split, self.indexed = split, Path(source).is_dir()
        self.eval_missing_ok = eval_missing_ok
        self._lost, self._may_lose = 0, 0  # an evaluation worker's lost samples, and its bound
        self.batch_size, self.decode, self.collate, self.train = batch_size, decode, collate, train
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.shuffle_buffer = max(1, shuffle_buffer)
        self.global_batch, self.below, self.exclude = global_batch, below, exclude
        self.tar_cache = tar_cache
        if below:  # the shards past the bound are never read
            n = shards_below(self.counts, below)
            self.urls, self.counts = self.urls[:n], self.counts[:n]
        self.epoch = 0
        self.start_batch = 0  # the rank batch the next iteration starts at (train only)

    @property
    def samples(self) -> int:
        """Samples an epoch draws from (for the global stream: those selected)."""
        total = sum(self.counts)
        if not self.global_batch:
            return total
        end = min(self.below, total) if self.below else total
        return end - sum(1 for i in self.exclude if i < end)

    def batches_per_worker(self, workers: int) -> int:
        """Training batches each worker yields per epoch (the same on every rank)."""
        return self.samples // (self.world_size * workers) // self.batch_size

    def _slot(self, j: int, workers: int, order: list[int]) -> list[Piece]:
        n, slots = self.samples, self.world_size * workers
        if self.train:  # rank's share first, then the worker's share of it
            lo, hi = self.rank * n // self.world_size, (self.rank + 1) * n // self.world_size
            return plan(self.counts, order, lo + j * (hi - lo) // workers,
                        lo + (j + 1) * (hi - lo) // workers)
        s = self.rank * workers + j
        return plan(self.counts, order, s * n // slots, (s + 1) * n // slots)

    def _raw(self, pieces: list[Piece]) -> Iterator[Sample]:
        for shard, first, end in pieces:
            missing = self.skipped["missing samples"]
            yield from read_piece(self.urls[shard], first, end, self.skipped,
                                  self.counts[shard] if self.indexed else None)
            if not self.train and self.skipped["missing samples"] > missing:
                self._lose(self.urls[shard], self.skipped["missing samples"] - missing,
                           f"holds {end - first - (self.skipped['missing samples'] - missing)} "
                           f"of the {end - first} samples its index lists from sample {first}")

    def _lose(self, where: str, n: int, what: str) -> None:
        """An evaluation worker lost ``n`` samples at ``where``: refused past its bound."""
        self._lost += n
        if self._lost > self._may_lose:
            raise DamagedDataError(
                f"{where} {what}: a score over the {self.split} split would leave out samples "
                f"its index lists; write the shards again, or allow a fraction with "
                f"data.eval_missing_ok")

    def _decoded(self, raw: Iterator[Sample], rng: np.random.Generator, count: int) -> list:
        items = []
        for sample in raw:
            try:
                items.append(self.decode(sample, rng))
            except (ValueError, OSError, KeyError, SyntaxError) as exc:
                self.skipped["undecodable sample"] += 1
                log.warning("sample %s: undecodable, skipped (%s); %d skipped so far",
                            sample.get("__key__"), exc, sum(self.skipped.values()))
                if not self.train:
                    self._lose(f"sample {sample.get('__key__')!r}", 1, f"cannot be decoded ({exc})")
                continue
            if len(items) == count:
                break
        return items

    def __iter__(self) -> Iterator[tuple[object, dict[str, int]]]:
        """``(batch, skipped)``: each batch with the skips (reason → count) met since the one
        before, so counts made in a DataLoader worker reach the loader."""
        seen = Counter(self.skipped)
        for batch in self._batches():
            yield batch, dict(self.skipped - seen)
            seen = Counter(self.skipped)

    def _batches(self) -> Iterator:
        info = get_worker_info()
        k, workers = (info.id, info.num_workers) if info else (0, 1)
        if not self.train:
            yield from self._eval(k, workers)
            return
        if self.global_batch:
            yield from self._global_batches()
            return
        b = self.start_batch
        j = (k + b) % workers  # rotate: the DataLoader's first worker owns rank batch b
        first = max(0, -(-(b - j) // workers))  # this worker's batches before rank batch b
        quota = self.batches_per_worker(workers)
        order = list(range(len(self.urls)))
        random.Random(_seed(self.seed, self.epoch)).shuffle(order)
        pieces = self._slot(j, workers, order)
        batch, passes = 0, 0
        counted, replayed = Counter(self.skipped), first > 0
        while batch < quota:
            # A second pass over the range only happens when bad samples ate into the quota.
            rng = random.Random(_seed(self.seed, self.epoch, self.rank, j, passes))
            raw = buffer_shuffle(self._raw(pieces), self.shuffle_buffer, rng)
            produced = 0
            while batch < quota:
                if batch < first:  # resume: skip raw samples, decode nothing
                    got = sum(1 for _ in zip(range(self.batch_size), raw, strict=False))
                    batch, produced = batch + (got == self.batch_size), produced + got
                    if got < self.batch_size:
                        break
                    continue
                if replayed:
                    self._forget_replay(counted)
                    replayed = False
                brng = np.random.default_rng(_seed(self.seed, self.epoch, self.rank, j, batch))
                items = self._decoded(raw, brng, self.batch_size)
                produced += len(items)
                if len(items) < self.batch_size:
                    break
                yield self.collate(items, brng)
                batch += 1
            if produced == 0:
                raise DataSourceError(f"rank {self.rank} worker {j}: no readable sample in "
                                      f"{[self.urls[p[0]] for p in pieces]}")
            passes += 1

    def _forget_replay(self, counted: Counter) -> None:
        """Back to the skips ``counted`` before a resume's replay up to its position: what the
        replay met again (a damaged tar) is in the position already. In place, since the readers
        still open hold this Counter."""
        self.skipped.clear()
        self.skipped.update(counted)

    def _selected(self, samples: Iterator[Sample]) -> Iterator[Sample]:
        if not (self.below or self.exclude):
            yield from samples
            return
        for sample in samples:
            i = sample_index(sample)
            if (self.below and i >= self.below) or i in self.exclude:
                continue
            yield sample

    def _global_batches(self) -> Iterator:
        """The epoch's global batches from ``start_batch`` on (the epoch replayed up to it)."""
        # A different, reproducible order every epoch: seeds from (seed, epoch).
        seed = random.Random(self.seed * 1_000_003 + self.epoch).randrange(2**31)
        n = len(self.urls)
        order = wds.shuffle(n, initial=n, seed=seed)(iter(range(n)))
        raw = self._selected(s for i in order for s in of_split(
            self.urls[i], read_whole_tar(self.urls[i], self.skipped, self.tar_cache,
                                         self.counts[i] if self.indexed else None), self.split))
        raw = wds.shuffle(self.shuffle_buffer, initial=self.shuffle_buffer, seed=seed + 1)(raw)
        counted = Counter(self.skipped)
        for batch in itertools.count():
            if batch == self.start_batch:
                self._forget_replay(counted)
            items = self._decoded(raw, None, self.batch_size)
            if len(items) < self.batch_size:  # the rest of the epoch: dropped
                if batch == 0:
                    raise DataSourceError(f"the training shards {self.urls[0]}… yield no full "
                                          f"batch of {self.batch_size}")
                return
            if batch >= self.start_batch:
                yield self.collate(items, None)

    def _eval(self, k: int, workers: int) -> Iterator:
        pieces = self._slot(k, workers, list(range(len(self.urls))))
        self._lost = 0
        self._may_lose = int(self.eval_missing_ok * sum(end - first for _, first, end in pieces))
        raw = self._raw(pieces)
        batch = 0
        while True:
            rng = np.random.default_rng(_seed(self.seed, self.rank, k, batch))
            items = self._decoded(raw, rng, self.batch_size)
            if not items:
                return
            yield self.collate(items, rng)
            batch += 1


class ShardLoader:
    """Batches of a :class:`ShardStream` through a torch DataLoader with ``num_workers``.

    Training streams are endless and resumable (``position``/``seek``); evaluation streams yield
    every batch of the rank's share once per ``iter()``. ``skipped``: bad data met by this
    rank's reader and all its workers, by reason (part of ``position``, so a resume keeps it).
    """

    def __init__(self, stream: ShardStream, num_workers: int = 0, pin_memory: bool = False):
        self.stream, self.num_workers, self.pin_memory = stream, num_workers, pin_memory
        self.epoch, self.batch = 0, 0
        self.skipped = Counter(stream.skipped)  # damaged shards found while indexing them
        self._it: Iterator | None = None
        if stream.global_batch and num_workers:
            raise ValueError("the global stream is read by one process (num_workers 0)")
        if stream.train and stream.batches_per_worker(max(1, num_workers)) == 0:
            raise DataSourceError(
                f"{stream.samples} training samples are too few for {stream.world_size} rank(s) "
                f"× {max(1, num_workers)} worker(s) × batch {stream.batch_size}")

    @property
    def position(self) -> dict:
        """``{"epoch": e, "batch": b, "skipped": {reason: n}}``: the next batch and the bad data
        skipped so far (what a checkpoint saves)."""
        return {"epoch": self.epoch, "batch": self.batch, "skipped": dict(self.skipped)}

    def seek(self, position: dict) -> None:
        """Continue from a saved ``position``: the next batch is the one that would have come."""
        self.epoch, self.batch = int(position["epoch"]), int(position["batch"])
        self.skipped = Counter(position.get("skipped", {}))
        self._it = None

    @property
    def batches_per_epoch(self) -> int:
        """Rank batches per training epoch (the same on every rank)."""
        workers = max(1, self.num_workers)
        return workers * self.stream.batches_per_worker(workers)

    def _loader(self) -> Iterator:
        self.stream.epoch, self.stream.start_batch = self.epoch, self.batch
        return _one_line_errors(iter(DataLoader(self.stream, batch_size=None,
                                                num_workers=self.num_workers,
                                                pin_memory=self.pin_memory)))

    def _counted(self, pair: tuple[object, dict[str, int]]):
        batch, skipped = pair
        self.skipped.update(skipped)
        return batch

    def __iter__(self) -> Iterator:
        if self.stream.train:
            return self
        self.stream.epoch, self.stream.start_batch = 0, 0
        return map(self._counted, self._loader())

    def __next__(self):
        if self._it is None:
            self._it = self._loader()
        try:
            out = next(self._it)
        except StopIteration:
            self.epoch, self.batch = self.epoch + 1, 0
            self._it = self._loader()
            out = next(self._it)
        self.batch += 1
        return self._counted(out)


def _one_line_errors(batches: Iterator) -> Iterator:
    """``batches``, with a DataLoader worker's :class:`DataSourceError` (or subclass) as the one
    line it was raised with: torch raises it again in this process with the worker's traceback in
    the message ("Caught DataSourceError in DataLoader worker process 0. Original Traceback …")."""
    try:
        yield from batches
    except remote.NOT_DAMAGE as exc:
        text = str(exc)
        if not text.startswith("Caught "):
            raise
        raise type(exc)(text.rsplit(f"{type(exc).__name__}: ", 1)[-1].strip()) from None


def _image_item(sample: Sample, rng, transform) -> tuple[np.ndarray, int]:
    return transform(sample["jpg"], rng), int(sample["cls"])


def _eval_image(data: bytes, rng, resize: int, size: int) -> np.ndarray:
    return T.eval_transform(data, resize, size)


def _image_collate(items: list[tuple[np.ndarray, int]], rng, normalize: bool
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    images = torch.from_numpy(np.stack([x for x, _ in items]))  # (B, H, W, 3) uint8
    labels = torch.tensor([y for _, y in items], dtype=torch.long)  # (B,)
    return (T.normalize(images) if normalize else images), labels


def image_stream(source: str | Path, *, train: bool, batch_size: int, split: str | None = None,
                 rank: int = 0, world_size: int = 1, num_workers: int = 0, seed: int = 0,
                 shuffle_buffer: int = 1000, size: int = 224, resize: int = 256,
                 normalize: bool = True, pin_memory: bool = False,
                 eval_missing_ok: float = 0.0) -> ShardLoader:
    """Image batches ``(x, y)`` from ``gwtn shards imagefolder`` shards.

    x: float32 (B, 3, size, size) normalised with ImageNet's mean/std (``normalize=False``: uint8
    (B, size, size, 3), to normalise on the accelerator with ``image_transforms.normalize``);
    y: int64 (B,). Training: random-resized-crop + flip; eval (split ``val``): resize + centre crop.
    """
    transform = (partial(T.train_transform, size=size) if train
                 else partial(_eval_image, resize=resize, size=size))
    stream = ShardStream(source, split or ("train" if train else "val"), batch_size=batch_size,
                         decode=partial(_image_item, transform=transform),
                         collate=partial(_image_collate, normalize=normalize), train=train,
                         rank=rank, world_size=world_size, seed=seed,
                         shuffle_buffer=shuffle_buffer, eval_missing_ok=eval_missing_ok)
    return ShardLoader(stream, num_workers, pin_memory)


def _token_ids(sample: Sample, rng) -> np.ndarray:
    return npy.loads(sample["ids.npy"])


def _mlm_collate(items: list[np.ndarray], rng, *, vocab_size: int, specials: dict[str, int],
                 probability: float) -> dict[str, torch.Tensor]:
    ids = np.stack(items)  # (B, L) uint16/int32
    inputs, labels = mask_tokens(ids, rng, vocab_size=vocab_size, mask_id=specials["[MASK]"],
                                 special_ids=list(specials.values()), probability=probability)
    return {"input_ids": torch.from_numpy(inputs),
            "attention_mask": torch.from_numpy((ids != specials["[PAD]"]).astype(np.int64)),
            "labels": torch.from_numpy(labels)}


def text_stream(source: str | Path, *, train: bool, batch_size: int, split: str | None = None,
                rank: int = 0, world_size: int = 1, num_workers: int = 0, seed: int = 0,
                shuffle_buffer: int = 1000, mlm_probability: float = 0.15,
                pin_memory: bool = False, eval_missing_ok: float = 0.0) -> ShardLoader:
    """Masked-LM batches from ``gwtn shards wikipedia|text`` shards (a folder with index.json).

    Each batch is ``{"input_ids", "attention_mask", "labels"}``, int64 (B, seq_len): dynamic BERT
    masking (:func:`mlm.mask_tokens`) drawn fresh per batch; labels are -100 where not masked.
    """
    url = remote.is_url(str(source))
    index = read_index(source) if url or (Path(source) / "index.json").is_file() else {}
    if index.get("format") != "tokens":
        raise DataSourceError(f"{source}: not a token shard folder (write one with "
                              f"`gwtn shards wikipedia|text`)")
    specials = index.get("special_ids")
    if not (_counts([index.get("vocab_size"), index.get("seq_len")]) and isinstance(specials, dict)
            and {"[MASK]", "[PAD]"} <= set(specials) and _counts(list(specials.values()))):
        raise DamagedDataError(f"{Path(source) / 'index.json'} is not a token shard index: it "
                               f"needs vocab_size, seq_len and special_ids ([MASK], [PAD]); "
                               f"write the shards again with `gwtn shards text|wikipedia`")
    collate = partial(_mlm_collate, vocab_size=index["vocab_size"],
                      specials=index["special_ids"], probability=mlm_probability)
    stream = ShardStream(source, split or ("train" if train else "val"), batch_size=batch_size,
                         decode=_token_ids, collate=collate, train=train, rank=rank,
                         world_size=world_size, seed=seed, shuffle_buffer=shuffle_buffer,
                         eval_missing_ok=eval_missing_ok)
    return ShardLoader(stream, num_workers, pin_memory)
