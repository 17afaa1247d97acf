"""Readers: exact eval coverage over ranks × workers, balanced training, exact resume, bad data,
and the image transforms."""

from __future__ import annotations

import io
import math
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from gwtn_dist.data import image_transforms as T
from gwtn_dist.data.errors import DataSourceError
from gwtn_dist.data.streams import ShardLoader, ShardStream, image_stream, text_stream
from gwtn_dist.data.text_shards import write_text_shards
from gwtn_dist.data.writer import ShardSink, merge_reports, split_report, write_index


def _key(sample, rng):
    return sample["__key__"]


def _keys(items, rng):
    return list(items)


def key_stream(source, *, train, batch_size=4, rank=0, world_size=1, num_workers=0, seed=0,
               shuffle_buffer=8, split="train") -> ShardLoader:
    """A stream whose batches are the sample keys: what tests of coverage need."""
    stream = ShardStream(source, split, batch_size=batch_size, decode=_key, collate=_keys,
                         train=train, rank=rank, world_size=world_size, seed=seed,
                         shuffle_buffer=shuffle_buffer)
    return ShardLoader(stream, num_workers)


@pytest.fixture(scope="module")
def uneven(tmp_path_factory) -> Path:
    """101 samples in 3 uneven shards (50, 40, 11), with an index.json."""
    out = tmp_path_factory.mktemp("uneven")
    sinks, n = {}, 0
    for i, count in enumerate([50, 40, 11]):
        sinks[i] = ShardSink(out, f"train-w{i:02d}", maxcount=100)
        for _ in range(count):
            sinks[i].write({"__key__": f"s{n:04d}", "txt": f"{n}"})
            n += 1
        sinks[i].close()
    reports = [split_report({"train": s}, {}) for s in sinks.values()]
    write_index(out, merge_reports(reports, {"format": "test"}))
    return out


ALL = {f"s{i:04d}" for i in range(101)}


@pytest.mark.parametrize("workers", [0, 2])
def test_eval_visits_every_sample_once_across_ranks_and_workers(uneven, workers):
    seen = Counter()
    for rank in range(2):
        for batch in key_stream(uneven, train=False, rank=rank, world_size=2,
                                num_workers=workers):
            assert 1 <= len(batch) <= 4
            seen.update(batch)
    assert set(seen) == ALL and set(seen.values()) == {1}


def test_training_epoch_is_balanced_and_disjoint_across_ranks(uneven):
    loaders = [key_stream(uneven, train=True, rank=r, world_size=2, num_workers=2, seed=5)
               for r in range(2)]
    # 101 // (2 ranks × 2 workers) = 25 samples per worker → 6 batches of 4 → 12 per rank.
    assert [ld.batches_per_epoch for ld in loaders] == [12, 12]
    epochs = []
    for ld in loaders:
        batches = [next(ld) for _ in range(12)]
        assert ld.position == {"epoch": 0, "batch": 12, "skipped": {}}
        epochs.append([k for b in batches for k in b])
    assert all(len(e) == len(set(e)) == 48 for e in epochs)
    assert not set(epochs[0]) & set(epochs[1])  # no sample on two ranks within an epoch
    second = [k for _ in range(12) for k in next(loaders[0])]
    assert loaders[0].position == {"epoch": 1, "batch": 12, "skipped": {}}
    assert second != epochs[0]  # a new order every epoch
    again = key_stream(uneven, train=True, rank=0, world_size=2, num_workers=2, seed=5)
    assert [k for _ in range(12) for k in next(again)] == epochs[0]  # same seed, same order


def test_more_ranks_than_shards_leaves_no_rank_dry(uneven):
    for rank in range(5):
        ld = key_stream(uneven, train=True, rank=rank, world_size=5, batch_size=5)
        assert ld.batches_per_epoch == 4
        keys = [k for _ in range(9) for k in next(ld)]  # past the end of the first epoch
        assert len(keys) == 45 and len(set(keys[:20])) == 20
        assert ld.position == {"epoch": 2, "batch": 1, "skipped": {}}


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_continues_the_same_order(uneven, workers):
    ref = key_stream(uneven, train=True, rank=1, world_size=2, num_workers=workers, seed=3)
    per_epoch = ref.batches_per_epoch
    stream = [next(ref) for _ in range(per_epoch + 6)]
    for stop in (1, 5, per_epoch - 1, per_epoch, per_epoch + 3):
        resumed = key_stream(uneven, train=True, rank=1, world_size=2, num_workers=workers,
                             seed=3)
        resumed.seek({"epoch": stop // per_epoch, "batch": stop % per_epoch})
        assert [next(resumed) for _ in range(3)] == stream[stop : stop + 3], stop


@pytest.mark.parametrize("workers", [0, 2])
def test_a_resume_does_not_count_again_the_damage_it_skips_over(uneven, tmp_path, workers):
    """A tar cut short after it was indexed is met while reading; a resume past that point
    skips over it again, and the position it started from already counts it."""
    for f in uneven.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    tar = tmp_path / "train-w01-00000.tar"  # 40 samples by the index
    tar.write_bytes(tar.read_bytes()[: tar.stat().st_size // 2])

    def stream():
        return key_stream(tmp_path, train=True, num_workers=workers, seed=3)

    ref = stream()
    for _ in range(ref.batches_per_epoch):  # read until the damage is met
        if ref.skipped:
            break
        next(ref)
    # The tar, and the 19 of its 40 samples (by the index) after the cut.
    assert ref.skipped == Counter({"truncated tar": 1, "missing samples": 19})
    position = ref.position  # counts the damage
    for _ in range(2):  # a batch of each worker: the skips travel with a worker's batches
        next(ref)
    resumed = stream()
    resumed.seek(position)
    for _ in range(2):
        next(resumed)
    assert resumed.position == ref.position


@pytest.mark.parametrize("workers", [0, 2])
def test_shards_unreadable_after_indexing_end_in_one_line(uneven, tmp_path, workers):
    """No readable sample where the index promised some: one line, whether a DataLoader
    worker (which torch wraps with its traceback) or the process itself found it."""
    for f in uneven.iterdir():
        data = f.read_bytes() if f.suffix == ".json" else b"not a tar" * 500
        (tmp_path / f.name).write_bytes(data)
    with pytest.raises(DataSourceError, match="no readable sample") as caught:
        next(key_stream(tmp_path, train=True, num_workers=workers))
    assert "\n" not in str(caught.value) and "Traceback" not in str(caught.value)


def test_a_pattern_that_matches_nothing_names_the_pattern(tmp_path):
    pattern = str(tmp_path / "train-{000..009}.tar")
    with pytest.raises(DataSourceError, match=r"train-\{000\.\.009\}\.tar"):
        key_stream(pattern, train=False)


def test_corrupt_and_truncated_tars_are_skipped_and_counted(uneven, tmp_path):
    for name in ("train-w00-00000.tar", "train-w01-00000.tar"):
        (tmp_path / name).write_bytes((uneven / name).read_bytes())
    whole = (uneven / "train-w02-00000.tar").read_bytes()
    (tmp_path / "train-w02-00000.tar").write_bytes(whole[: len(whole) // 2])  # truncated
    (tmp_path / "train-w03-00000.tar").write_bytes(b"garbage, not a tar" * 100)
    loader = key_stream(str(tmp_path / "train-*.tar"), train=False)
    keys = [k for batch in loader for k in batch]
    assert set(keys[:90]) == {f"s{i:04d}" for i in range(90)}
    assert 0 < len(keys) - 90 < 11  # the samples before the cut are kept
    assert loader.stream.skipped == Counter({"truncated tar": 1, "unreadable tar": 1})


def jpeg(array: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(array).save(out, format="JPEG", quality=92)
    return out.getvalue()


def png(array: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(array).save(out, format="PNG")
    return out.getvalue()


@pytest.fixture(scope="module")
def image_shards(tmp_path_factory) -> Path:
    """24 train / 10 val images of 3 classes, one undecodable member in train."""
    out = tmp_path_factory.mktemp("img")
    rng = np.random.default_rng(0)
    reports = []
    for split, n in (("train", 24), ("val", 10)):
        sink = ShardSink(out, f"{split}-w00", maxcount=10)
        for i in range(n):
            data = jpeg(rng.integers(0, 255, (60 + i, 80, 3), dtype=np.uint8))
            sink.write({"__key__": f"{split}-{i:04d}", "jpg": data, "cls": i % 3})
        if split == "train":
            sink.write({"__key__": "train-bad", "jpg": b"\xff\xd8 broken", "cls": 0})
        sink.close()
        reports.append(split_report({split: sink}, {}))
    write_index(out, merge_reports(reports, {"format": "imagefolder"}))
    return out


def test_image_streams_give_model_ready_batches(image_shards):
    ev = image_stream(image_shards, train=False, batch_size=4, num_workers=2, size=32, resize=40)
    batches = list(ev)
    labels = torch.cat([y for _, y in batches])
    assert Counter(labels.tolist()) == Counter(i % 3 for i in range(10))
    assert all(x.shape[1:] == (3, 32, 32) and x.dtype == torch.float32 for x, _ in batches)
    tr = image_stream(image_shards, train=True, batch_size=4, size=32, seed=1, shuffle_buffer=5)
    seen = [next(tr) for _ in range(tr.batches_per_epoch + 1)]  # 25 samples, 1 undecodable
    assert tr.stream.skipped["undecodable sample"] >= 1
    assert all(x.shape == (4, 3, 32, 32) for x, _ in seen)
    raw = image_stream(image_shards, train=True, batch_size=4, size=32, normalize=False)
    x, _ = next(raw)
    assert x.dtype == torch.uint8 and x.shape == (4, 32, 32, 3)


@pytest.mark.parametrize("workers", [0, 2])
def test_skips_made_in_workers_reach_the_loader_and_its_position(image_shards, workers):
    """The undecodable training image is counted once per epoch, whichever process decoded
    it; the count is part of the position a checkpoint saves."""
    tr = image_stream(image_shards, train=True, batch_size=4, size=32, seed=1,
                      shuffle_buffer=5, num_workers=workers)
    for _ in range(2 * tr.batches_per_epoch):  # two epochs
        next(tr)
    assert tr.skipped == Counter({"undecodable sample": 2})
    assert tr.position["skipped"] == {"undecodable sample": 2}
    ev = image_stream(image_shards, train=False, batch_size=4, num_workers=workers, size=32,
                      resize=40)
    list(ev)
    assert ev.skipped == Counter()  # the val split has no bad image
    resumed = image_stream(image_shards, train=True, batch_size=4, size=32, seed=1,
                           shuffle_buffer=5, num_workers=workers)
    resumed.seek(tr.position)
    next(resumed)
    assert resumed.skipped["undecodable sample"] >= 2


def test_resumed_image_batches_are_bit_identical(image_shards):
    """Crops, flips and their order come back exactly after a seek (augmentation is seeded per
    batch, so the skipped batches cost no random state)."""
    def stream():
        return image_stream(image_shards, train=True, batch_size=2, size=24, seed=4,
                            num_workers=2, shuffle_buffer=6)

    ref = stream()
    batches = [next(ref) for _ in range(8)]  # 25 samples → 12 batches of 2 per epoch; 1 bad
    resumed = stream()
    resumed.seek({"epoch": 0, "batch": 5})
    for (x, y), (rx, ry) in zip(batches[5:], (next(resumed) for _ in range(3)), strict=True):
        assert torch.equal(x, rx) and torch.equal(y, ry)


def test_text_stream_masks_at_load_time(tmp_path):
    (tmp_path / "t.txt").write_text("\n\n".join(f"the cat sat on mat {i}" for i in range(200)))
    write_text_shards([tmp_path / "t.txt"], tmp_path / "s", seq_len=24, vocab_size=80,
                      val_every=0, progress=False)
    loader = text_stream(tmp_path / "s", train=True, batch_size=8, seed=0)
    batch = next(loader)
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    assert all(v.shape == (8, 24) and v.dtype == torch.int64 for v in batch.values())
    chosen = batch["labels"] != -100
    assert 0 < chosen.float().mean() < 0.4
    assert (batch["input_ids"][chosen] != batch["labels"][chosen]).any()  # masked or swapped
    assert (batch["input_ids"][:, 0] == 2).all()  # [CLS] never masked
    with pytest.raises(DataSourceError, match="not a token shard folder"):
        text_stream(tmp_path, train=True, batch_size=8)


@pytest.mark.parametrize("seed", range(40))
def test_crop_params_follow_random_resized_crop(seed):
    rng = np.random.default_rng(seed)
    width, height = int(rng.integers(10, 500)), int(rng.integers(10, 500))
    top, left, h, w = T.crop_params(width, height, rng)
    assert 0 <= top and top + h <= height and 0 <= left and left + w <= width
    # Rounding to whole pixels moves area and aspect a little off the sampled values.
    tol = 1 + 2 / min(h, w)
    assert h * w <= width * height and h * w >= 0.08 * width * height / tol**2 or (
        top == (height - h) // 2 and left == (width - w) // 2)
    assert 3 / 4 / tol <= w / h <= 4 / 3 * tol or w in (width, round(height * 4 / 3))


def test_crop_falls_back_to_a_centred_allowed_aspect():
    # 1000 × 10: no sampled box with aspect ≤ 4/3 fits; the fallback is the centred 13 × 10.
    assert T.crop_params(1000, 10, np.random.default_rng(0)) == (0, 493, 10, 13)


def test_train_transform_is_crop_resize_and_exact_flip():
    rng = np.random.default_rng(7)
    image = rng.integers(0, 255, (50, 70, 3), dtype=np.uint8)
    data = png(image)  # lossless and not JPEG: no draft, so the expectation is exact
    flips = set()
    for seed in range(12):
        out = T.train_transform(data, np.random.default_rng(seed), size=16)
        twin = np.random.default_rng(seed)
        top, left, h, w = T.crop_params(70, 50, twin)
        flip = twin.random() < 0.5
        crop = Image.fromarray(image).resize((16, 16), Image.BILINEAR,
                                             box=(left, top, left + w, top + h))
        expected = np.asarray(crop)[:, ::-1] if flip else np.asarray(crop)
        assert out.shape == (16, 16, 3) and out.dtype == np.uint8
        assert np.array_equal(out, expected)
        flips.add(flip)
    assert flips == {True, False}


def test_eval_transform_resizes_the_shorter_side_then_centre_crops():
    image = np.zeros((300, 512, 3), np.uint8)
    image[:, 256:] = 255  # right half white: the crop's centre column is the boundary
    out = T.eval_transform(png(image), resize=256, size=224)
    assert out.shape == (224, 224, 3)
    # 512×300 → 436×256 (torchvision's int(256·512/300)); left = round((436−224)/2) = 106, so
    # the boundary at x = 218 of the resized image falls at column 112 of the crop.
    row = out[100, :, 0].astype(int)
    assert (row[:110] == 0).all() and (row[115:] == 255).all()


def test_jpeg_draft_decode_matches_a_full_decode():
    rng = np.random.default_rng(0)
    smooth = np.kron(rng.integers(0, 255, (60, 80, 3)), np.ones((10, 10, 1))).astype(np.uint8)
    data = jpeg(smooth)  # 800 × 600: draft decodes the eval path at 1/2 scale
    drafted = T.eval_transform(data, 256, 224).astype(float)
    full = Image.open(io.BytesIO(data)).convert("RGB").resize((341, 256), Image.BILINEAR)
    full = np.asarray(full)[16:240, 58:282].astype(float)
    assert np.abs(drafted - full).mean() < 6


def test_normalize_uses_imagenet_statistics():
    x = torch.tensor([0, 255], dtype=torch.uint8).view(2, 1, 1, 1).expand(2, 4, 5, 3)
    y = T.normalize(x)
    assert y.shape == (2, 3, 4, 5) and y.dtype == torch.float32
    for c in range(3):
        assert math.isclose(y[0, c, 0, 0], -T.IMAGENET_MEAN[c] / T.IMAGENET_STD[c], rel_tol=1e-6)
        assert math.isclose(y[1, c, 2, 3], (1 - T.IMAGENET_MEAN[c]) / T.IMAGENET_STD[c],
                            rel_tol=1e-6)


def test_webdataset_reads_our_shards(image_shards):
    """The shards are plain webdataset: its own reader sees the same samples."""
    urls = [str(p) for p in sorted(image_shards.glob("val-*.tar"))]
    keys = [s["__key__"] for s in wds.WebDataset(urls, shardshuffle=False)]
    assert keys == [f"val-{i:04d}" for i in range(10)]
