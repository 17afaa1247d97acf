"""The datasets ``data.dataset`` names, and what each means to the rest of the code.

One :class:`Dataset` per value (``dataset_of(cfg)``) answers what the stages, the comparison and
the teacher cache would otherwise branch on:

- ``fashion-mnist`` (idx-derived ``npy`` shards, written on first use from Debian's package):
  :class:`~.batches.GlobalBatches` for training; ``data.val_samples`` training images are held
  out as the validation split. Evaluation strides the test (or validation) batches over the ranks.
- ``imagefolder`` (``gwtn shards imagefolder``, JPEG): :class:`~.batches.RankBatches` of
  ``streams.image_stream`` (random-resized-crop + flip, ImageNet's normalisation); evaluation reads
  the ``val`` split, every image once over all ranks, for both ``val`` and ``test``.
- ``text`` (``gwtn shards text|wikipedia``, token sequences): :class:`~.batches.RankBatches` of
  ``streams.text_stream`` with BERT's dynamic masking; evaluation reads the ``val`` or ``test``
  split asked for, every sequence once over all ranks (shards written before ``--test-every``
  hold no ``test``: ``val`` is read for both).
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from ..config.schema import Config
from . import remote

# The readers (torch, webdataset) are imported where a batch is made, so that the config checks
# that ask this registry a question (is a validation split carved out?) load no torch.
if TYPE_CHECKING:
    from .batches import TrainBatches

log = logging.getLogger("gwtn")


class Dataset:
    """What one ``data.dataset`` value means: its splits, its batch sources, how its shards come
    to be. Methods take the config (the shard folder and the data settings are in it; the
    ``data`` section is the dataset's own class, ``config.schema.<Name>DataConfig``, so only
    the dataset's own methods read its own keys)."""

    name: str
    # True when a run writes missing shards itself (``ensure_shards``) instead of failing.
    written_on_first_use = False

    def carved_val_samples(self, cfg: Config) -> int | None:
        """Training samples held out as the validation split (``data.val_samples``, 0 = none),
        or None when the dataset's validation split is a split of its own."""
        return None

    def carves_validation(self, cfg: Config) -> bool:
        """Whether a non-empty validation split is carved out of the training data (then curves
        and choices read it, and the test split is read apart)."""
        return bool(self.carved_val_samples(cfg))

    def image_side(self, cfg: Config) -> int | None:
        """The side of the square images a net is fed (None for data that is not images)."""
        return None

    def loss_share(self, cfg: Config) -> float:
        """The share of a batch's positions that the loss is taken at (masked-LM's chosen
        tokens; 1 where every sample is scored): the planner's trace stands it in for the
        selections whose size depends on the data."""
        return 1.0

    def split_samples(self, cfg: Config) -> dict[str, int]:
        """Samples per split of the config's shards where the splits vary (token shards may or
        may not hold a ``test`` split); ``{}`` for image shards, whose splits are fixed, and for
        shards that cannot be read (the readers then say what is wrong)."""
        return {}

    def test_split_identity(self, cfg: Config) -> dict:
        """What, beyond the shard folder's path, decides which samples are held out as the test
        split (a cached teacher keys on it); {} when the path says it all."""
        return {}

    def write_shards(self, cfg: Config) -> None:
        """Write the config's shards (only where ``written_on_first_use``)."""
        raise NotImplementedError(f"{self.name} shards are written with `gwtn shards`")

    def train_batches(self, cfg: Config, stream_seed: int, rank: int,
                      world: int) -> TrainBatches:
        """Rank ``rank`` of ``world``'s training batches; ``stream_seed`` orders the data."""
        raise NotImplementedError

    def eval_batches(self, cfg: Config, limit: int, rank: int, world: int,
                     split: str) -> Iterator[tuple]:
        """Rank ``rank`` of ``world``'s share of held-out ``split``, model-ready (see
        ``rank_eval_batches``, which reads it lazily: a shard error surfaces on the
        first batch)."""
        raise NotImplementedError


class FashionMnist(Dataset):
    name = "fashion-mnist"
    written_on_first_use = True

    def carved_val_samples(self, cfg: Config) -> int | None:
        return cfg.data.val_samples

    def image_side(self, cfg: Config) -> int | None:
        return 28

    def write_shards(self, cfg: Config) -> None:
        from .fashion_mnist import write_fashion_mnist

        write_fashion_mnist(Path(cfg.data.shards), None, progress=cfg.progress)

    def train_batches(self, cfg: Config, stream_seed: int, rank: int,
                      world: int) -> TrainBatches:
        from .batches import GlobalBatches

        return GlobalBatches(cfg, stream_seed, rank, world)

    def eval_batches(self, cfg: Config, limit: int, rank: int, world: int,
                     split: str) -> Iterator[tuple]:
        from .batches import validation
        from .shards import eval_batches, to_model_input

        # Every rank reads all batches and keeps every world-th.
        d = cfg.data
        if split == "val":
            batches = eval_batches(d.shards, d.eval_batch_size, split="train", limit=limit,
                                   only=validation(cfg), missing_ok=d.eval_missing_ok)
        else:
            batches = eval_batches(d.shards, d.eval_batch_size, limit=limit,
                                   missing_ok=d.eval_missing_ok)
        for i, (images, labels) in enumerate(batches):
            if i % world == rank:
                yield to_model_input(images, d.mean, d.std), labels


def _rank_share(loader, cfg: Config, limit: int, world: int) -> Iterator[tuple]:
    """A per-rank evaluation stream, cut to about ``limit`` samples over all ranks (0 = all)."""
    per_rank = -(-limit // (world * cfg.data.eval_batch_size)) if limit else None
    yield from itertools.islice(loader, per_rank)


class ImageFolder(Dataset):
    name = "imagefolder"

    def image_side(self, cfg: Config) -> int | None:
        return cfg.data.image_size

    def train_batches(self, cfg: Config, stream_seed: int, rank: int,
                      world: int) -> TrainBatches:
        from .batches import RankBatches
        from .streams import image_stream

        d = cfg.data
        return RankBatches(image_stream(d.shards, train=True, batch_size=d.batch_size // world,
                                        rank=rank, world_size=world,
                                        num_workers=d.num_workers, seed=stream_seed,
                                        shuffle_buffer=d.shuffle_buffer, size=d.image_size,
                                        resize=d.eval_resize))

    def eval_batches(self, cfg: Config, limit: int, rank: int, world: int,
                     split: str) -> Iterator[tuple]:
        from .streams import image_stream

        d = cfg.data  # one held-out split, val, read for both val and test
        loader = image_stream(d.shards, train=False, batch_size=d.eval_batch_size, rank=rank,
                              world_size=world, num_workers=d.num_workers, size=d.image_size,
                              resize=d.eval_resize, eval_missing_ok=d.eval_missing_ok)
        return _rank_share(loader, cfg, limit, world)


class Text(Dataset):
    name = "text"

    def loss_share(self, cfg: Config) -> float:
        return cfg.data.mlm_probability

    def split_samples(self, cfg: Config) -> dict[str, int]:
        from .batches import token_split_samples

        return token_split_samples(cfg.data.shards)

    def test_split_identity(self, cfg: Config) -> dict:
        """``val_every``/``test_every`` (and split rule) of token shards that have a test split;
        {} for shards without one, so keys of teachers trained on two-split shards stay what
        they were. A folder rewritten with a test split no longer trains on those documents."""
        try:
            from .streams import read_index

            index = read_index(cfg.data.shards)
        except (OSError, ValueError):
            return {}
        if "test" not in index.get("splits", {}):
            return {}
        periods = {"val_every": index.get("val_every"), "test_every": index.get("test_every")}
        if "split_rule" in index:  # the same periods take other documents under another rule
            periods["split_rule"] = index["split_rule"]
        return periods

    def train_batches(self, cfg: Config, stream_seed: int, rank: int,
                      world: int) -> TrainBatches:
        from .batches import RankBatches, checked_text_stream, split_mlm

        return RankBatches(checked_text_stream(cfg, True, cfg.data.batch_size // world, rank,
                                               world, seed=stream_seed), split_mlm)

    def eval_batches(self, cfg: Config, limit: int, rank: int, world: int,
                     split: str) -> Iterator[tuple]:
        from .batches import checked_text_stream, split_mlm, text_eval_split

        d = cfg.data
        loader = checked_text_stream(cfg, False, d.eval_batch_size, rank, world,
                                     split=text_eval_split(d.shards, split))
        return _rank_share(map(split_mlm, loader), cfg, limit, world)


DATASETS: dict[str, Dataset] = {d.name: d for d in (FashionMnist(), ImageFolder(), Text())}


def dataset_of(cfg: Config) -> Dataset:
    """The :class:`Dataset` of ``cfg.data.dataset``."""
    return DATASETS[cfg.data.dataset]


def ensure_shards(cfg: Config, is_main: bool, wait_s: float = 600.0) -> None:
    """Write the config's shards if its folder has none and its dataset is written on first use
    (Fashion-MNIST, from Debian's package).

    Only the main rank (``is_main``) writes; the caller holds the other ranks at a barrier until
    it is done. A process that finds another writing them (e.g. a second compare worker) waits
    up to ``wait_s`` for it first.
    """
    from ..workers import FileLock

    if remote.is_url(str(cfg.data.shards)):
        return  # shards over the network are read, never written
    shards = Path(cfg.data.shards)
    if dataset_of(cfg).written_on_first_use and any(c in str(shards) for c in "*?[{"):
        # A pattern names existing tars; shards written here go into a folder.
        from .streams import resolve_shards

        resolve_shards(shards, "train")  # a pattern that matches nothing: one line naming it
        return
    if dataset_of(cfg).written_on_first_use and is_main:
        deadline = time.monotonic() + wait_s
        while FileLock(shards / ".lock").busy() and time.monotonic() < deadline:
            time.sleep(1.0)
        if not (shards / "index.json").is_file():
            log.info("no shards in %s yet: writing them from the installed Fashion-MNIST", shards)
            dataset_of(cfg).write_shards(cfg)


def train_batches(cfg: Config, stream_seed: int, rank: int, world: int) -> TrainBatches:
    """Rank ``rank`` of ``world``'s training batches; ``stream_seed`` gives each stage its own
    data order."""
    return dataset_of(cfg).train_batches(cfg, stream_seed, rank, world)


def rank_eval_batches(cfg: Config, limit: int, rank: int, world: int,
                      split: str = "test") -> Iterator[tuple]:
    """Rank ``rank`` of ``world``'s share of the held-out ``split`` (``test``, or ``val``: the
    validation split carved out of Fashion-MNIST's training data, or the token shards' ``val``
    documents; image folders, and token shards without a ``test`` split, have one held-out split,
    ``val``, read for both), model-ready; over all ranks every sample once.
    limit: only about the first ``limit`` samples (0 = all). Text masking is drawn from a fixed
    seed, so every evaluation of a run scores the same masked tokens.
    """
    yield from dataset_of(cfg).eval_batches(cfg, limit, rank, world, split)
