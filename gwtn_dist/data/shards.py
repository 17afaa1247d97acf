"""Webdataset shards: writing image datasets, and reading them back as batches.

A shard folder holds ``train-%05d.tar`` and ``test-%05d.tar`` plus ``index.json`` (which also
lists every split's labels, so a validation split can be carved out of ``train`` without reading
it). Each sample is
``{"__key__": "<split>-<index>", "npy": uint8 (H, W) or (H, W, C), "cls": int}``.

The validation split (``validation_indices``) is a seeded, class-stratified set of training
indices: training streams skip it, and ``eval_batches(..., only=indices)`` reads just it, so
choices (lr, steps, …) are made on data that is neither trained on nor the test split.

Training batches (``train_stream``) are the one shard reader's global stream
(``streams.ShardStream``): endless and deterministic, epoch ``e`` shuffles the shard order and a
sample buffer with seeds derived from (seed, e), so a position (epoch, batch) is enough to resume
exactly where a run stopped.
"""

from __future__ import annotations

import functools
import json
import logging
import os
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from . import npy, remote
from .errors import DamagedDataError, DataSourceError
from .streams import (
    ShardLoader,
    ShardStream,
    indexed_shards,
    of_split,
    read_index,
    read_whole_tar,
    sample_index,
    shards_below,
)
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
    """Paths of ``split``'s shards; with ``limit``, only those holding the first ``limit``
    samples (``streams.shards_below``)."""
    urls, info = indexed_shards(shard_dir, split)
    if limit and "shard_samples" in info:
        urls = urls[: shards_below(info["shard_samples"], limit)]
    return urls


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
    chosen = [rng.permutation(np.flatnonzero(labels == c))[:n]
              for c, n in zip(classes, take, strict=True)]
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


def _npy_pair(sample: dict, rng: None) -> tuple[np.ndarray, int]:
    # uint8 (H, W) or (H, W, C), and the label; npy.loads parses a shard's one header once
    # (a tenth of what webdataset's generic decode cost per image).
    return npy.loads(sample["npy"]), int(sample["cls"])


def _collate(samples: list[tuple[np.ndarray, int]], rng: None = None
             ) -> tuple[torch.Tensor, torch.Tensor]:
    images = np.stack([s[0] for s in samples])  # (B, H, W) or (B, H, W, C) uint8
    images = images[:, None] if images.ndim == 3 else images.transpose(0, 3, 1, 2)
    images = torch.from_numpy(np.ascontiguousarray(images))  # (B, C, H, W) uint8
    labels = torch.tensor([s[1] for s in samples], dtype=torch.long)  # (B,)
    return images, labels


def train_stream(shard_dir: Path | str, batch_size: int, seed: int, shuffle_buffer: int = 5000,
                 limit: int = 0, exclude: frozenset[int] = frozenset()) -> ShardLoader:
    """Endless shuffled training batches of image shards, with a resumable position: the
    global stream of ``streams.ShardStream`` (every rank reads it and takes its slice), whole
    tars kept in memory.

    Yields ``(images, labels)``: uint8 (B, C, H, W) and int64 (B,). ``position`` is
    ``{"epoch": e, "batch": b, "skipped": {reason: n}}``; ``seek`` replays epoch ``e`` up to
    batch ``b``. ``exclude``: training indices never yielded (the validation split);
    ``limit``: only the first ``limit`` of the remaining samples, in index order.
    """
    if limit:
        total = sum(indexed_shards(shard_dir, "train")[1]["shard_samples"])
        if limit > total - len(exclude):
            raise DataSourceError(
                f"data.train_samples: {limit} is more than the {total - len(exclude)} training "
                f"samples in {shard_dir}" + (f" (after the {len(exclude)} held out for "
                                             f"validation)" if exclude else ""))
    bound = _bound_after(limit, exclude, None)
    stream = ShardStream(shard_dir, "train", batch_size=batch_size, decode=_npy_pair,
                         collate=_collate, train=True, seed=seed, shuffle_buffer=shuffle_buffer,
                         global_batch=True, below=0 if bound == NO_BOUND else bound,
                         exclude=exclude, tar_cache=True)
    return ShardLoader(stream)


def eval_batches(shard_dir: Path | str, batch_size: int, split: str = "test",
                 limit: int = 0, only: frozenset[int] | None = None, missing_ok: float = 0.0
                 ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Every sample of ``split`` exactly once, in file order (the first ``limit`` if set).

    only: read just these indices of ``split`` (the validation split, out of ``train``).

    The split is decoded on the first evaluation and kept in memory for the process (an
    MNIST-size split is a few MB): a validation pass every ``eval_every`` steps would otherwise
    re-read the training tars, since the validation indices are spread over all of them. The
    cache is keyed by the shard files' size and mtime, so rewritten shards are read again.

    Every tar is read to its index's count and must hold ``split``'s samples; when damaged
    tars or undecodable samples leave fewer samples than the index lists (more than the
    fraction ``missing_ok`` of them), a ``DamagedDataError`` names the first damaged tar.
    """
    bound = _bound_after(limit, frozenset(), only)
    urls, info = indexed_shards(shard_dir, split)
    counts = list(info["shard_samples"])
    if bound < NO_BOUND:
        urls, counts = urls[:shards_below(counts, bound)], counts[:shards_below(counts, bound)]
    stamp = tuple(map(_stamp, urls))
    return _slices(tuple(urls), tuple(counts), stamp, bound, only, batch_size, split,
                   missing_ok)


def _stamp(url: str) -> tuple[int, int]:
    """(size, mtime) of a shard file; a URL's is taken as unchanging (read once a process)."""
    if remote.is_url(url):
        return 0, 0
    st = os.stat(url)
    return st.st_size, st.st_mtime_ns


def _slices(urls: tuple[str, ...], counts: tuple[int, ...], stamp: tuple, bound: int,
            only: frozenset[int] | None, batch_size: int, split: str, missing_ok: float
            ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    # A generator, so a shard error surfaces on the first batch, as when streaming.
    # uint8 (N, C, H, W), int64 (N,)
    images, labels = _decoded_split(urls, counts, stamp, bound, only, split, missing_ok)
    for start in range(0, len(labels), batch_size):
        # Copies: a caller may change a batch in place; the cached split must stay as read.
        yield images[start:start + batch_size].clone(), labels[start:start + batch_size].clone()


@functools.lru_cache(maxsize=4)
def _decoded_split(urls: tuple[str, ...], counts: tuple[int, ...], stamp: tuple, bound: int,
                   only: frozenset[int] | None, split: str, missing_ok: float
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """The selected samples of ``urls`` (``counts`` samples each, by the index) decoded:
    uint8 (N, C, H, W) and int64 (N,); refused when damage leaves too few (``eval_batches``)."""
    del stamp  # part of the cache key only
    pairs, damage = [], []  # damage: what was lost where, in file order
    past = False  # a sample at or past the bound was met: the rest is not read
    for url, count in zip(urls, counts, strict=True):
        if past:
            break
        skipped: Counter = Counter()
        for sample in of_split(url, read_whole_tar(url, skipped, cache=False, count=count),
                               split):
            index = sample_index(sample)
            if index >= bound:
                past = True
                break
            if only is not None and index not in only:
                continue
            try:
                pairs.append(_npy_pair(sample, None))
            except (ValueError, KeyError) as exc:
                damage.append(f"sample {sample['__key__']!r} cannot be decoded ({exc})")
        if skipped:
            damage.append(f"{url} is damaged ({', '.join(f'{n} {r}' for r, n in skipped.items())})")
    _refuse_short(len(pairs), only, bound, sum(counts), damage, split, missing_ok)
    if not pairs:
        return torch.zeros((0, 1, 1, 1), dtype=torch.uint8), torch.zeros(0, dtype=torch.long)
    return _collate(pairs)


def _refuse_short(got: int, only: frozenset[int] | None, bound: int, total: int,
                  damage: list[str], split: str, missing_ok: float) -> None:
    """A ``DamagedDataError`` naming the first damage when fewer than the samples the index
    lists were read (beyond the fraction ``missing_ok`` of them)."""
    expected = sum(1 for i in only if i < bound) if only is not None else min(bound, total)
    if got >= expected - int(missing_ok * expected):
        if got < expected:
            log.warning("%s: %d of %d samples read (data.eval_missing_ok allows it): %s", split,
                        got, expected, "; ".join(damage))
        return
    name = f"the validation split (out of {split!r})" if only is not None else f"the {split} split"
    first = damage[0] if damage else "the shards hold fewer samples than index.json lists"
    raise DamagedDataError(f"{first}: {name} reads {got} of the {expected} samples its index "
                           f"lists, and a score over fewer is refused; write the shards again, "
                           f"or allow a fraction with data.eval_missing_ok")


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
