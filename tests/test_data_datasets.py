"""The dataset registry answers what the stages, the comparison and the teacher cache ask of a
``data.dataset`` value, and hands out the batch sources each one reads."""

from __future__ import annotations

import json
import typing

import pytest

from gwtn_dist.config import Config, DataConfig
from gwtn_dist.data.batches import GlobalBatches, RankBatches
from gwtn_dist.data.datasets import DATASETS, dataset_of, ensure_shards


def _cfg(dataset: str, shards, **data) -> Config:
    return Config(data=DataConfig.variants()[dataset](shards=str(shards), **data))


def test_every_dataset_value_has_an_entry():
    values = typing.get_args(typing.get_type_hints(DataConfig)["dataset"])
    assert set(DATASETS) == set(values) == {"fashion-mnist", "imagefolder", "text"}
    for name, entry in DATASETS.items():
        assert dataset_of(_cfg(name, "x")) is entry and entry.name == name


def test_only_fashion_mnist_carves_a_validation_split_out_of_training(shard_dir):
    fm = _cfg("fashion-mnist", shard_dir, val_samples=200)
    assert dataset_of(fm).carved_val_samples(fm) == 200 and dataset_of(fm).carves_validation(fm)
    none = _cfg("fashion-mnist", shard_dir, val_samples=0)
    assert dataset_of(none).carved_val_samples(none) == 0
    assert not dataset_of(none).carves_validation(none)
    for name in ("imagefolder", "text"):  # their sections have no val_samples to set
        cfg = _cfg(name, shard_dir)
        assert dataset_of(cfg).carved_val_samples(cfg) is None
        assert not dataset_of(cfg).carves_validation(cfg)


def test_split_counts_and_the_test_split_identity(shard_dir, tmp_path):
    fm = _cfg("fashion-mnist", shard_dir)
    assert dataset_of(fm).split_samples(fm) == {}  # fixed splits: train, test
    assert dataset_of(fm).test_split_identity(fm) == {}
    tokens = {"format": "tokens", "val_every": 3, "test_every": 4, "split_rule": "r",
              "splits": {name: {"samples": n, "shards": [], "shard_samples": []}
                         for name, n in (("train", 9), ("val", 2), ("test", 1))}}
    (tmp_path / "index.json").write_text(json.dumps(tokens))
    text = _cfg("text", tmp_path)
    assert dataset_of(text).split_samples(text) == {"train": 9, "val": 2, "test": 1}
    assert dataset_of(text).test_split_identity(text) == {"val_every": 3, "test_every": 4,
                                                          "split_rule": "r"}
    # Image shards are no token shards: the text entry counts nothing there.
    wrong = _cfg("text", shard_dir)
    assert dataset_of(wrong).split_samples(wrong) == {}
    assert dataset_of(_cfg("text", tmp_path / "none")).split_samples(
        _cfg("text", tmp_path / "none")) == {}


def test_fashion_mnist_reads_global_batches_and_other_formats_per_rank_streams(shard_dir):
    cfg = _cfg("fashion-mnist", shard_dir, batch_size=64, shuffle_buffer=300, val_samples=0)
    batches = dataset_of(cfg).train_batches(cfg, 7, rank=1, world=2)
    assert isinstance(batches, GlobalBatches) and not batches.per_rank
    x, y = batches.next(0, 0)
    assert x.shape[0] == y.shape[0] == 32
    assert RankBatches.per_rank


def test_shards_are_written_on_first_use_only_by_the_main_rank_and_only_for_fashion_mnist(
        tmp_path, monkeypatch):
    written = []
    entry = DATASETS["fashion-mnist"]
    monkeypatch.setattr(type(entry), "write_shards", lambda self, cfg: written.append(cfg))
    fm = _cfg("fashion-mnist", tmp_path / "fm")
    ensure_shards(fm, is_main=False)
    assert written == []
    ensure_shards(fm, is_main=True)
    assert written == [fm]
    ensure_shards(_cfg("imagefolder", tmp_path / "img"), is_main=True)
    assert len(written) == 1
    with pytest.raises(NotImplementedError):
        DATASETS["text"].write_shards(_cfg("text", tmp_path))
