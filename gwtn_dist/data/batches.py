"""What the training loop and evaluation read: this rank's model-ready batches.

Training batches come through one interface, :class:`TrainBatches` (``next(phase_index, step)``,
a resumable ``position`` / ``seek``, the bad data ``skipped``), named by how ranks share the data:

- :class:`GlobalBatches`: every rank reads the same global batch, which is augmented (crop + flip,
  seeded by (seed, phase, step)) and normalised, and takes its slice, so N ranks × b see exactly
  what 1 rank × N·b sees (Fashion-MNIST's ``npy`` shards);
- :class:`RankBatches`: each rank (and each DataLoader worker) reads its own share of every epoch
  (``data.streams``), already decoded and augmented or masked (image folders, token shards).

Which dataset uses which, and how it is evaluated, is ``data.datasets``' registry; the rank and
world size are passed in. ``data.datasets.train_batches`` and ``rank_eval_batches`` look the
dataset up and make its batches.

Images give x float32 (b, C, H, W) and y int64 (b,); text gives x = {"input_ids",
"attention_mask"} and y = the masked-LM labels (-100 where no loss is taken), all int64
(b, seq_len).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path

import torch

from ..config.schema import Config
from . import remote
from .errors import DataSourceError
from .shards import augment, to_model_input, train_stream, validation_indices
from .streams import ShardLoader, read_index, text_stream


def _batch_generator(seed: int, phase_index: int, step: int) -> torch.Generator:
    # Augmentation randomness is a function of (seed, phase, step) alone, so it replays on resume.
    return torch.Generator().manual_seed(seed * 1_000_003 + phase_index * 100_003 + step)


@functools.lru_cache(maxsize=8)
def _validation_of(shards: str, samples: int, seed: int) -> frozenset[int]:
    return validation_indices(shards, samples, seed)


def validation(cfg: Config) -> frozenset[int]:
    """The training indices held out as the validation split (Fashion-MNIST shards)."""
    d = cfg.data
    return _validation_of(str(d.shards), d.val_samples, d.val_seed)


class TrainBatches:
    """A resumable source of this rank's training batches: ``next(phase_index, step)``, and
    ``position`` / ``seek`` / ``skipped`` delegated to the underlying stream (``self.source``).

    ``position`` is what a checkpoint saves (``{"epoch", "batch", "skipped"}``); ``seek`` to it
    makes the next batch the one that would have come.
    """

    source: ShardLoader
    # True when each rank reads its own stream (its skips are its own, summed over ranks);
    # False when every rank reads the one global stream (every rank sees the same skips).
    per_rank: bool = True

    @property
    def skipped(self) -> dict[str, int]:
        """Bad data this rank's reader (and its workers) skipped so far, by reason."""
        return dict(self.source.skipped)

    @property
    def position(self) -> dict:
        """The next batch and the skips so far (the checkpoint's ``position``)."""
        return self.source.position

    def seek(self, position: dict) -> None:
        """Continue from a saved ``position``."""
        self.source.seek(position)

    def next(self, phase_index: int, step: int) -> tuple:
        """This rank's (x, y) for ``step`` of phase ``phase_index``."""
        raise NotImplementedError


class GlobalBatches(TrainBatches):
    """Every rank reads the global stream of image shards; the batch is augmented, normalised
    and sliced: rank ``rank`` of ``world`` (default: the only one) takes rows r·b … (r+1)·b − 1,
    b = batch_size / world."""

    per_rank = False

    def __init__(self, cfg: Config, stream_seed: int, rank: int = 0, world: int = 1):
        d = cfg.data
        self.cfg, self.seed, self.rank, self.world = cfg, cfg.seed, rank, world
        self.source = train_stream(d.shards, d.batch_size, seed=stream_seed,
                                   shuffle_buffer=d.shuffle_buffer, limit=d.train_samples,
                                   exclude=validation(cfg))

    def _slice(self, batch: torch.Tensor) -> torch.Tensor:
        b = batch.shape[0] // self.world
        return batch[self.rank * b : (self.rank + 1) * b]

    def next(self, phase_index: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        d = self.cfg.data
        images, labels = next(self.source)  # the global batch: uint8 (B, C, H, W), (B,)
        images = augment(images, _batch_generator(self.seed, phase_index, step),
                         d.crop_padding, d.hflip)
        return to_model_input(self._slice(images), d.mean, d.std), self._slice(labels)


class RankBatches(TrainBatches):
    """This rank's own stream (its share of every epoch, already decoded and augmented or
    masked); ``convert`` turns a stream batch into (x, y) where the stream's is not."""

    def __init__(self, source: ShardLoader, convert: Callable[[object], tuple] | None = None):
        self.source, self.convert = source, convert

    def next(self, phase_index: int, step: int) -> tuple:
        batch = next(self.source)
        return self.convert(batch) if self.convert else batch


def split_mlm(batch: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """A text_stream batch → (model input, labels)."""
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}, \
        batch["labels"]


@functools.lru_cache(maxsize=16)
def _token_split_samples(shards: str, mtime_ns: int) -> dict[str, int]:
    index = read_index(shards)
    if index.get("format") != "tokens":
        return {}
    return {split: int(info["samples"]) for split, info in index["splits"].items()}


def token_split_samples(shards: str | Path) -> dict[str, int]:
    """Samples per split of the token shards in folder ``shards`` (``{}`` when it holds no
    token index.json; the readers then say what is wrong). Read again when index.json changes."""
    try:  # a URL's index is read once
        mtime = 0 if remote.is_url(str(shards)) else \
            (Path(shards) / "index.json").stat().st_mtime_ns
        return _token_split_samples(str(shards), mtime)
    except (OSError, ValueError, KeyError, TypeError):
        return {}


def text_eval_split(shards: str | Path, split: str) -> str:
    """The token-shard split that evaluation of ``split`` reads: ``test`` only when asked and
    the shards hold a non-empty one; otherwise ``val`` (two-split shards: one held-out split)."""
    return "test" if split == "test" and token_split_samples(shards).get("test") else "val"


def checked_text_stream(cfg: Config, train: bool, batch_size: int, rank: int, world: int,
                        seed: int = 0, split: str | None = None) -> ShardLoader:
    """``streams.text_stream`` of the config's token shards for rank ``rank`` of ``world``,
    refused when the shards' vocabulary or sequences do not fit the model."""
    d = cfg.data
    loader = text_stream(d.shards, train=train, batch_size=batch_size, split=split, rank=rank,
                         world_size=world, num_workers=d.num_workers, seed=seed,
                         shuffle_buffer=d.shuffle_buffer, mlm_probability=d.mlm_probability,
                         eval_missing_ok=d.eval_missing_ok)
    index = read_index(d.shards)  # text_stream checked it
    if index["vocab_size"] > cfg.model.vocab_size or index["seq_len"] > cfg.model.max_len:
        raise DataSourceError(
            f"{d.shards}: vocabulary {index['vocab_size']} and sequences of {index['seq_len']} "
            f"tokens do not fit model.vocab_size {cfg.model.vocab_size} and model.max_len "
            f"{cfg.model.max_len}"
        )
    return loader
