"""Webdataset shards: writing image datasets, and reading them back as batches.

A shard folder holds ``train-%05d.tar`` and ``test-%05d.tar`` plus ``index.json`` (which also
lists every split's labels, so a validation split can be carved out of ``train`` without reading
it). Each sample is ``{"__key__": "<split>-<index>", "npy": uint8 (H, W) or (H, W, C), "cls": int}``.

The validation split (``validation_indices``) is a seeded, class-stratified set of training
indices: training streams skip it, and ``eval_batches(..., only=indices)`` reads just it, so
choices (lr, steps, …) are made on data that is neither trained on nor the test split.

Training batches come from an endless, deterministic stream: epoch ``e`` shuffles the shard
order and a sample buffer with seeds derived from (seed, e), so a position (epoch, batch) is
enough to resume exactly where a run stopped.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import random
import tarfile
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from tqdm import tqdm

from . import npy
from .errors import DataSourceError
from .streams import ResumablePosition, indexed_shards, read_index
from .writer import ShardSink

log = logging.getLogger("gwtn")
SHARD_SIZE = 10_000


def write_image_shards(out: Path | str, splits: dict[str, tuple[np.ndarray, np.ndarray]],
                       source: str, classes: list[str], progress: bool = True) -> dict:
    """Write each split's (images, labels) into ``OUT/<split>-%05d.tar``; returns the index.

    Safe against a kill and against a second writer: the folder is locked while it is written
    (a second writer fails at once naming the holder), the old index goes first, every tar is
    written under a temporary name and renamed when complete, and the new index comes last, so
    a folder with an index.json never lists a torn or missing tar.
    """
    from ..workers import FileLock

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    lock = FileLock(out / ".lock")
    if not lock.acquire():
        held = lock.holder() or {}
        raise DataSourceError(f"{out} is being written by process {held.get('pid', '?')} on "
                              f"{held.get('host', '?')}; wait for it, or remove {lock.path} if "
                              f"that process is gone")
    try:
        (out / "index.json").unlink(missing_ok=True)
        index: dict = {"source": source, "classes": classes, "splits": {}}
        for split, (images, labels) in splits.items():
            for old in out.glob(f"{split}-*.tar"):
                old.unlink()
            sink = ShardSink(out, split, SHARD_SIZE)
            for i in tqdm(range(len(images)), desc=f"shards {split}", disable=not progress,
                          unit="img", mininterval=1.0):
                sink.write({"__key__": f"{split}-{i:07d}", "npy": images[i],
                            "cls": labels[i].item()})
            sink.close()
            index["splits"][split] = {
                "shards": sink.shards, "shard_samples": sink.counts, "samples": len(images),
                "skipped": 0, "shape": list(images.shape[1:]),
                "labels": [int(v) for v in labels],
            }
        tmp = out / "index.json.tmp"
        tmp.write_text(json.dumps(index, indent=2))
        tmp.replace(out / "index.json")
    finally:
        lock.release()
    return index


def shard_urls(shard_dir: Path | str, split: str, limit: int = 0) -> list[str]:
    """Paths of ``split``'s shards; with ``limit``, only those holding the first ``limit`` samples.

    Shards hold consecutive sample indices in order, so the first N samples live in a prefix of
    the shard list, and reading the other shards would only be filtered away.
    """
    urls, info = indexed_shards(shard_dir, split)
    if limit and "shard_samples" in info:
        ends = np.cumsum(info["shard_samples"])
        urls = urls[: next((i + 1 for i, e in enumerate(ends) if e >= limit), len(urls))]
    return urls


def _sample_index(key: str) -> int:
    return int(key.rsplit("-", 1)[1])


def _select(bound: int, exclude: frozenset[int], include: frozenset[int] | None,
            ordered: bool):
    """Keep samples with index < bound that are not in ``exclude`` (and, if given, are in
    ``include``); in file order, stop reading at the first index past the bound."""

    def stage(samples):
        for sample in samples:
            i = _sample_index(sample["__key__"])
            if i >= bound:
                if ordered:
                    return
                continue
            if i in exclude or (include is not None and i not in include):
                continue
            yield sample

    return stage


def validation_indices(shard_dir: Path | str, samples: int, seed: int = 0) -> frozenset[int]:
    """``samples`` training indices, stratified by class and drawn with ``seed``: the
    validation split. Each class gets its share of ``samples`` (largest remainders round)."""
    if samples == 0:
        return frozenset()
    info = read_index(shard_dir)["splits"]["train"]
    if "labels" not in info:
        raise DataSourceError(f"{shard_dir}: index.json lists no training labels, so no validation "
                              f"split can be carved; rewrite the shards with `gwtn shards "
                              f"fashion-mnist {shard_dir}`")
    labels = np.asarray(info["labels"])
    if samples > len(labels) // 4:
        raise DataSourceError(f"data.val_samples: {samples} is more than a quarter of the "
                              f"{len(labels)} training samples in {shard_dir}")
    classes, counts = np.unique(labels, return_counts=True)
    share = counts * samples / len(labels)
    take = np.floor(share).astype(int)
    for c in np.argsort(-(share - take), kind="stable")[: samples - take.sum()]:
        take[c] += 1
    rng = np.random.default_rng(seed)
    chosen = [rng.permutation(np.flatnonzero(labels == c))[:n] for c, n in zip(classes, take)]
    return frozenset(int(i) for i in np.concatenate(chosen))


NO_BOUND = 1 << 62


def _bound_after(count: int, exclude: frozenset[int], include: frozenset[int] | None) -> int:
    """The smallest index bound below which ``count`` samples are kept (count 0: all of them;
    ``NO_BOUND`` when that means every index)."""
    if include is not None:
        kept = sorted(include)
        n = min(count, len(kept)) if count else len(kept)
        return kept[n - 1] + 1 if n else 0
    if not count:
        return NO_BOUND
    bound, kept = 0, 0
    while kept < count:  # walk indices, skipping the excluded ones
        kept += bound not in exclude
        bound += 1
    return bound


def _collate(samples: list[tuple[np.ndarray, int]]) -> tuple[torch.Tensor, torch.Tensor]:
    images = np.stack([s[0] for s in samples])  # (B, H, W) or (B, H, W, C) uint8
    images = images[:, None] if images.ndim == 3 else images.transpose(0, 3, 1, 2)
    images = torch.from_numpy(np.ascontiguousarray(images))  # (B, C, H, W) uint8
    labels = torch.tensor([s[1] for s in samples], dtype=torch.long)  # (B,)
    return images, labels


# Tars read whole and without error are kept in memory for the process, keyed by (path, size,
# mtime): a small training set is re-read every epoch (5k Fashion-MNIST images: an epoch every
# 39 steps), and reading and untarring the same file again cost more than the step's data
# work. Bounded, so a large dataset streams from disk as before. The prefetch thread and an
# evaluation on the training thread may read at once, hence the lock.
TAR_CACHE_BYTES = 1 << 30
_tar_cache: dict[tuple[str, int, int], tuple[int, list[dict]]] = {}  # key → (bytes, samples)
_tar_cache_lock = threading.Lock()


def _tar_key(url: str) -> tuple[str, int, int] | None:
    try:
        st = os.stat(url)
    except OSError:  # not a local file (a pipe: or http URL): always streamed
        return None
    return url, st.st_size, st.st_mtime_ns


def _sample_bytes(sample: dict) -> int:
    return sum(len(v) for v in sample.values() if isinstance(v, (bytes, bytearray)))


def _cache_room() -> int:
    with _tar_cache_lock:
        return TAR_CACHE_BYTES - sum(used for used, _ in _tar_cache.values())


def _read_tars(handler: Callable[[Exception], bool]):
    """webdataset's tar reader (``tarfile_to_samples``) with the in-memory cache above.

    A tar is cached only once read to its end with no error handed to ``handler`` and only if
    it fits, so a damaged tar is read (and its bad data counted) again on every pass, as
    before, and a tar that cannot be kept is not held while it is read."""

    def stage(sources):
        for source in sources:
            key = _tar_key(source["url"])
            with _tar_cache_lock:
                cached = _tar_cache.get(key) if key else None
            if cached is not None:
                yield from (dict(sample) for sample in cached[1])  # copies: stages may edit them
                continue
            errors: list[Exception] = []

            def noting(exc: Exception, errors: list[Exception] = errors) -> bool:
                errors.append(exc)
                return handler(exc)

            room = _cache_room() if key else 0
            kept: list[dict] | None = [] if room > 0 else None
            size = 0
            for sample in wds.tarfile_to_samples(handler=noting)(iter([source])):
                if kept is not None:
                    size += _sample_bytes(sample)
                    kept.append(dict(sample))
                    if size > room:
                        kept = None  # will not fit: stop holding it
                yield sample
            if kept is None or errors:
                continue
            with _tar_cache_lock:
                for old in [k for k in _tar_cache if k[0] == key[0]]:  # a rewritten shard
                    del _tar_cache[old]
                if sum(used for used, _ in _tar_cache.values()) + size <= TAR_CACHE_BYTES:
                    _tar_cache[key] = (size, kept)

    return stage


def _pipeline(urls: list[str], batch_size: int, *, shuffle_seed: int | None, buffer: int,
              bound: int, exclude: frozenset[int], include: frozenset[int] | None,
              partial: bool, handler: Callable[[Exception], bool] = wds.warn_and_continue
              ) -> wds.DataPipeline:
    """handler(exc) → True: bad data (a damaged tar, an undecodable member) is skipped."""
    stages: list = [wds.SimpleShardList(urls)]
    if shuffle_seed is not None:
        stages.append(wds.shuffle(len(urls), initial=len(urls), seed=shuffle_seed))
    # No split_by_node: every rank reads the whole (global-batch) stream and the training loop
    # takes its slice, so N ranks see exactly what one rank would; eval strides batches by rank.
    stages += [wds.split_by_worker, _read_tars(handler)]
    if bound < NO_BOUND or exclude or include is not None:
        stages.append(_select(bound, exclude, include, ordered=shuffle_seed is None))
    if shuffle_seed is not None:
        stages.append(wds.shuffle(buffer, initial=buffer, seed=shuffle_seed + 1))
    stages += [_image_pairs(handler),
               wds.batched(batch_size, collation_fn=_collate, partial=partial)]
    return wds.DataPipeline(*stages)


def _image_pairs(handler: Callable[[Exception], bool]):
    """Each sample → (image, label): uint8 (H, W) or (H, W, C) and int. What webdataset's
    ``decode`` + ``to_tuple("npy", "cls")`` did, at a tenth of the data thread's cost per
    image (``npy.loads`` parses a shard's one header once). A sample that fails goes to
    ``handler``: True skips it, False ends the stream (webdataset's handler contract)."""

    def stage(samples):
        for sample in samples:
            try:
                pair = npy.loads(sample["npy"]), int(sample["cls"])
            except Exception as exc:  # noqa: BLE001 — any bad sample is the handler's to judge
                if handler(exc):
                    continue
                break
            yield pair

    return stage


class TrainStream(ResumablePosition):
    """Endless shuffled training batches with a resumable position.

    Yields ``(images, labels)``: uint8 (B, C, H, W) and int64 (B,). ``position`` is
    ``{"epoch": e, "batch": b, "skipped": {reason: n}}`` — the next batch to be yielded and the
    bad data skipped so far — and ``seek`` restores it by replaying epoch ``e``'s deterministic
    order up to batch ``b`` (the replay counts nothing twice). ``exclude``: training indices
    never yielded (the validation split); ``limit``: only the first ``limit`` of the remaining
    samples, in index order.
    """

    def __init__(self, shard_dir: Path | str, batch_size: int, seed: int,
                 shuffle_buffer: int = 5000, limit: int = 0,
                 exclude: frozenset[int] = frozenset()):
        self.bound = _bound_after(limit, exclude, None)
        self.urls = shard_urls(shard_dir, "train", self.bound if self.bound < NO_BOUND else 0)
        self.batch_size = batch_size
        self.seed = seed
        self.buffer = shuffle_buffer
        self.exclude = exclude
        self.epoch = 0
        self.batch = 0
        self.skipped: Counter = Counter()
        self._replaying = False
        self._it: Iterator | None = None

    def _skip(self, exc: Exception) -> bool:
        """webdataset's handler: count and log bad data, then go on (True)."""
        if not self._replaying:
            reason = "damaged tar" if isinstance(exc, (tarfile.TarError, EOFError)) \
                else "undecodable sample"
            self.skipped[reason] += 1
            log.warning("training shards: %s skipped (%s: %s)", reason, type(exc).__name__, exc)
        return True

    def _epoch_iter(self) -> Iterator:
        # A different, reproducible order every epoch: seeds from (seed, epoch).
        shuffle_seed = random.Random(self.seed * 1_000_003 + self.epoch).randrange(2**31)
        it = iter(_pipeline(self.urls, self.batch_size, shuffle_seed=shuffle_seed,
                            buffer=self.buffer, bound=self.bound, exclude=self.exclude,
                            include=None, partial=False, handler=self._skip))
        self._replaying = True  # the batches before the position were counted already
        try:
            for _ in range(self.batch):
                next(it)
        finally:
            self._replaying = False
        return it

    def __iter__(self) -> TrainStream:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        for _ in range(2):
            if self._it is None:
                self._it = self._epoch_iter()
            try:
                out = next(self._it)
            except StopIteration:
                if self.batch == 0:
                    break
                self.epoch, self.batch, self._it = self.epoch + 1, 0, None
                continue
            self.batch += 1
            return out
        raise DataSourceError(
            f"the training shards {self.urls[0]}… yield no full batch of {self.batch_size}"
        )


def eval_batches(shard_dir: Path | str, batch_size: int, split: str = "test",
                 limit: int = 0, only: frozenset[int] | None = None
                 ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Every sample of ``split`` exactly once, in file order (the first ``limit`` if set).

    only: read just these indices of ``split`` (the validation split, out of ``train``).

    The split is decoded on the first evaluation and kept in memory for the process (an
    MNIST-size split is a few MB): a validation pass every ``eval_every`` steps would otherwise
    re-read the training tars, since the validation indices are spread over all of them. The
    cache is keyed by the shard files' size and mtime, so rewritten shards are read again.
    """
    bound = _bound_after(limit, frozenset(), only)
    urls = tuple(shard_urls(shard_dir, split, bound if bound < NO_BOUND else 0))
    stamp = tuple((st.st_size, st.st_mtime_ns) for st in map(os.stat, urls))
    return _slices(urls, stamp, bound, only, batch_size)


def _slices(urls: tuple[str, ...], stamp: tuple, bound: int, only: frozenset[int] | None,
            batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    # A generator, so a shard error surfaces on the first batch, as when streaming.
    images, labels = _decoded_split(urls, stamp, bound, only)  # uint8 (N, C, H, W), int64 (N,)
    for start in range(0, len(labels), batch_size):
        # Copies: a caller may change a batch in place; the cached split must stay as read.
        yield images[start:start + batch_size].clone(), labels[start:start + batch_size].clone()


@functools.lru_cache(maxsize=4)
def _decoded_split(urls: tuple[str, ...], stamp: tuple, bound: int,
                   only: frozenset[int] | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The selected samples of ``urls`` decoded: uint8 (N, C, H, W) and int64 (N,)."""
    del stamp  # part of the cache key only
    batches = list(_pipeline(list(urls), 1024, shuffle_seed=None, buffer=0, bound=bound,
                             exclude=frozenset(), include=only, partial=True))
    if not batches:
        return torch.zeros((0, 1, 1, 1), dtype=torch.uint8), torch.zeros(0, dtype=torch.long)
    return torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])


def augment(images: torch.Tensor, generator: torch.Generator, padding: int,
            hflip: bool) -> torch.Tensor:
    """Random crop (zero padding) and horizontal flip of a uint8 batch (B, C, H, W), in torch."""
    b, _, h, w = images.shape
    if padding:
        padded = torch.nn.functional.pad(images, (padding,) * 4)
        dy = torch.randint(0, 2 * padding + 1, (b,), generator=generator)
        dx = torch.randint(0, 2 * padding + 1, (b,), generator=generator)
        rows = (dy[:, None] + torch.arange(h)[None, :])  # (B, H)
        cols = (dx[:, None] + torch.arange(w)[None, :])  # (B, W)
        batch_idx = torch.arange(b)[:, None, None]
        # padded: (B, C, H+2p, W+2p) → gather a (H, W) window per image
        images = padded.permute(0, 2, 3, 1)[batch_idx, rows[:, :, None], cols[:, None, :]]
        images = images.permute(0, 3, 1, 2)
    if hflip:
        flip = torch.rand(b, generator=generator) < 0.5
        images = torch.where(flip[:, None, None, None], images.flip(-1), images)
    return images


def to_model_input(images: torch.Tensor, mean: float, std: float) -> torch.Tensor:
    """uint8 (B, C, H, W) → normalised float (B, C, H, W)."""
    return (images.float() / 255.0 - mean) / std
