"""What the training loop and evaluation read: this rank's model-ready batches, per data format.

``data.dataset`` picks the format:
- ``fashion-mnist`` (idx-derived ``npy`` shards): every rank reads the same global batch, which
  is augmented (crop + flip, seeded by (seed, phase, step)) and normalised, and takes its
  slice, so N ranks × b see exactly what 1 rank × N·b sees. ``data.val_samples`` training
  images are held out as the validation split. Evaluation strides the test (or validation)
  batches over the ranks.
- ``imagefolder`` (``gwtn shards imagefolder``, JPEG): each rank (and each DataLoader worker)
  reads its own share of every epoch (``data.streams.image_stream``), decoded and augmented
  with random-resized-crop + flip and ImageNet's normalisation; evaluation reads the ``val``
  split, every image once over all ranks.
- ``text`` (``gwtn shards text|wikipedia``, token sequences): like ``imagefolder``, each rank
  reads its own share (``data.streams.text_stream``) with BERT's dynamic masking; evaluation
  reads the ``val`` or ``test`` split asked for, every sequence once over all ranks (shards
  written before ``--test-every`` hold no ``test``: ``val`` is read for both).

Images give x float32 (b, C, H, W) and y int64 (b,); text gives x = {"input_ids",
"attention_mask"} and y = the masked-LM labels (-100 where no loss is taken), all int64
(b, seq_len). Training batches have a resumable ``position``.
"""

from __future__ import annotations

import functools
import itertools
import json
from collections.abc import Iterator
from pathlib import Path

import torch

from ..config import Config
from ..distributed.runtime import current
from .errors import DataSourceError
from .shards import TrainStream, augment, eval_batches, to_model_input, validation_indices
from .streams import ShardLoader, image_stream, text_stream


def _batch_generator(seed: int, phase_index: int, step: int) -> torch.Generator:
    # Augmentation randomness is a function of (seed, phase, step) alone, so it replays on resume.
    return torch.Generator().manual_seed(seed * 1_000_003 + phase_index * 100_003 + step)


def _rank_slice(batch: torch.Tensor) -> torch.Tensor:
    """This rank's share of a global batch: rows r·b … (r+1)·b − 1."""
    rt = current()
    b = batch.shape[0] // rt.world_size
    return batch[rt.rank * b : (rt.rank + 1) * b]


@functools.lru_cache(maxsize=8)
def _validation_of(shards: str, samples: int, seed: int) -> frozenset[int]:
    return validation_indices(shards, samples, seed)


def _validation(cfg: Config) -> frozenset[int]:
    """The training indices held out as the validation split (Fashion-MNIST shards)."""
    d = cfg.data
    return _validation_of(str(d.shards), d.val_samples, d.val_seed)


class TrainBatches:
    """A resumable source of this rank's training batches: ``next(phase_index, step)``, and
    ``position`` / ``seek`` delegated to the underlying stream (``self.source``)."""

    source: TrainStream | ShardLoader
    # True when each rank reads its own stream (its skips are its own, summed over ranks);
    # False when every rank reads the one global stream (every rank sees the same skips).
    per_rank: bool = True

    @property
    def skipped(self) -> dict[str, int]:
        """Bad data this rank's reader (and its workers) skipped so far, by reason."""
        return dict(self.source.skipped)

    @property
    def position(self) -> dict:
        return self.source.position

    def seek(self, position: dict) -> None:
        self.source.seek(position)

    def next(self, phase_index: int, step: int) -> tuple:
        raise NotImplementedError


class GlobalBatches(TrainBatches):
    """Fashion-MNIST: the global stream, augmented, normalised and sliced for this rank."""

    per_rank = False

    def __init__(self, cfg: Config, stream_seed: int):
        d = cfg.data
        self.cfg, self.seed = cfg, cfg.seed
        self.source = TrainStream(d.shards, d.batch_size, seed=stream_seed,
                                  shuffle_buffer=d.shuffle_buffer, limit=d.train_samples,
                                  exclude=_validation(cfg))

    def next(self, phase_index: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        d = self.cfg.data
        images, labels = next(self.source)  # the global batch: uint8 (B, C, H, W), (B,)
        images = augment(images, _batch_generator(self.seed, phase_index, step),
                         d.crop_padding, d.hflip)
        return to_model_input(_rank_slice(images), d.mean, d.std), _rank_slice(labels)


class RankBatches(TrainBatches):
    """Image folders: this rank's own stream (its share of every epoch, already augmented)."""

    def __init__(self, cfg: Config, stream_seed: int):
        d, rt = cfg.data, current()
        self.source = image_stream(d.shards, train=True, batch_size=d.batch_size // rt.world_size,
                                   rank=rt.rank, world_size=rt.world_size,
                                   num_workers=d.num_workers, seed=stream_seed,
                                   shuffle_buffer=d.shuffle_buffer, size=d.image_size,
                                   resize=d.eval_resize)

    def next(self, phase_index: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        return next(self.source)


def _split_mlm(batch: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """A text_stream batch → (model input, labels)."""
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}, \
        batch["labels"]


@functools.lru_cache(maxsize=16)
def _token_split_samples(index_path: str, mtime_ns: int) -> dict[str, int]:
    index = json.loads(Path(index_path).read_text())
    if index.get("format") != "tokens":
        return {}
    return {split: int(info["samples"]) for split, info in index["splits"].items()}


def token_split_samples(shards: str | Path) -> dict[str, int]:
    """Samples per split of the token shards in folder ``shards`` (``{}`` when it holds no
    token index.json; the readers then say what is wrong). Read again when index.json changes."""
    path = Path(shards) / "index.json"
    try:
        return _token_split_samples(str(path), path.stat().st_mtime_ns)
    except (OSError, ValueError, KeyError, TypeError):
        return {}


def text_eval_split(shards: str | Path, split: str) -> str:
    """The token-shard split that evaluation of ``split`` reads: ``test`` only when asked and
    the shards hold a non-empty one; otherwise ``val`` (two-split shards: one held-out split)."""
    return "test" if split == "test" and token_split_samples(shards).get("test") else "val"


def _text_stream(cfg: Config, train: bool, batch_size: int, rank: int, seed: int = 0,
                 split: str | None = None):
    d, rt = cfg.data, current()
    loader = text_stream(d.shards, train=train, batch_size=batch_size, split=split, rank=rank,
                         world_size=rt.world_size, num_workers=d.num_workers, seed=seed,
                         shuffle_buffer=d.shuffle_buffer, mlm_probability=d.mlm_probability)
    index = json.loads((Path(d.shards) / "index.json").read_text())  # text_stream checked it
    if index["vocab_size"] > cfg.model.vocab_size or index["seq_len"] > cfg.model.max_len:
        raise DataSourceError(
            f"{d.shards}: vocabulary {index['vocab_size']} and sequences of {index['seq_len']} "
            f"tokens do not fit model.vocab_size {cfg.model.vocab_size} and model.max_len "
            f"{cfg.model.max_len}"
        )
    return loader


class TextBatches(TrainBatches):
    """Token shards: this rank's own stream of masked-LM batches."""

    def __init__(self, cfg: Config, stream_seed: int):
        rt = current()
        self.source = _text_stream(cfg, True, cfg.data.batch_size // rt.world_size, rt.rank,
                                   seed=stream_seed)

    def next(self, phase_index: int, step: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        return _split_mlm(next(self.source))


def train_batches(cfg: Config, stream_seed: int) -> TrainBatches:
    """This rank's training batches; ``stream_seed`` gives each stage its own data order."""
    if cfg.data.dataset == "text":
        return TextBatches(cfg, stream_seed)
    if cfg.data.dataset == "imagefolder":
        return RankBatches(cfg, stream_seed)
    return GlobalBatches(cfg, stream_seed)


def rank_eval_batches(cfg: Config, limit: int = 0, rank: int | None = None,
                      split: str = "test") -> Iterator[tuple]:
    """This rank's (or ``rank``'s) share of the held-out ``split`` (``test``, or ``val``: the
    validation split carved out of Fashion-MNIST's training data, or the token shards' ``val``
    documents; image folders, and token shards without a ``test`` split, have one held-out split,
    ``val``, read for both), model-ready; over all ranks every sample once.
    limit: only about the first ``limit`` samples (0 = all). Text masking is drawn from a fixed
    seed, so every evaluation of a run scores the same masked tokens."""
    d, rt = cfg.data, current()
    rank = rt.rank if rank is None else rank
    if d.dataset in ("text", "imagefolder"):  # a per-rank stream of a held-out split
        if d.dataset == "text":
            loader = map(_split_mlm, _text_stream(cfg, False, d.eval_batch_size, rank,
                                                  split=text_eval_split(d.shards, split)))
        else:
            loader = image_stream(d.shards, train=False, batch_size=d.eval_batch_size,
                                  rank=rank, world_size=rt.world_size,
                                  num_workers=d.num_workers, size=d.image_size,
                                  resize=d.eval_resize)
        per_rank = -(-limit // (rt.world_size * d.eval_batch_size)) if limit else None
        yield from itertools.islice(loader, per_rank)
        return
    if split == "val":
        batches = eval_batches(d.shards, d.eval_batch_size, split="train", limit=limit,
                               only=_validation(cfg))
    else:
        batches = eval_batches(d.shards, d.eval_batch_size, limit=limit)
    for i, (images, labels) in enumerate(batches):
        if i % rt.world_size == rank:
            yield to_model_input(images, d.mean, d.std), labels
