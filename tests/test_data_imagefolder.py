"""ImageNet-style folder → (jpg, cls) shards: counts, class index, bad files, parallel writers."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from gwtn_dist.data.errors import DataSourceError
from gwtn_dist.data.imagefolder import write_imagefolder_shards
from gwtn_dist.data.streams import image_stream

CLASSES = ["ant", "bee", "cow"]
REPO = Path(__file__).resolve().parents[1]


def make_image_folder(root: Path, per_class: dict[str, int], seed: int = 0) -> dict:
    """Real JPEGs (plus one PNG) in ``root/<split>/<class>/``, one corrupt and one truncated file
    in train; returns the expected label counts of the good images per split."""
    rng = np.random.default_rng(seed)
    expected: dict[str, Counter] = {}
    for split, n in per_class.items():
        expected[split] = Counter()
        for cls, name in enumerate(CLASSES):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(n):
                h, w = rng.integers(40, 90, 2)
                # A gradient plus noise: content that differs per image and survives JPEG.
                base = np.linspace(0, 255, w)[None, :, None] * (cls + 1) / 3
                img = np.clip(base + rng.normal(0, 20, (h, w, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(img).save(folder / f"img{i:03d}.jpg", quality=90)
                expected[split][cls] += 1
    Image.fromarray(np.zeros((30, 50, 3), np.uint8)).save(root / "train" / "bee" / "extra.png")
    expected["train"][1] += 1
    (root / "train" / "ant" / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    good = (root / "train" / "cow" / "img000.jpg").read_bytes()
    (root / "train" / "cow" / "truncated.jpg").write_bytes(good[: len(good) // 2])
    return expected


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("imagenet")
    return root, make_image_folder(root, {"train": 8, "val": 3})


@pytest.fixture(scope="module")
def shards(folder, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("imagenet_shards")
    write_imagefolder_shards(folder[0], out, workers=2, maxcount=10, progress=False)
    return out


def read_tar(path: Path) -> list[dict]:
    """The samples of a shard as {"__key__", ext: bytes}, in file order."""
    samples: dict[str, dict] = {}
    with tarfile.open(path) as tf:
        for m in tf:
            key, ext = m.name.split(".", 1)
            samples.setdefault(key, {"__key__": key})[ext] = tf.extractfile(m).read()
    return list(samples.values())


def test_index_counts_match_the_folder(folder, shards):
    _, expected = folder
    index = json.loads((shards / "index.json").read_text())
    assert index["classes"] == CLASSES and index["format"] == "imagefolder"
    train, val = index["splits"]["train"], index["splits"]["val"]
    assert train["samples"] == sum(expected["train"].values()) == 25
    assert val["samples"] == 9 and val["skipped"] == 0
    assert train["skipped"] == 2 and train["skipped_by_reason"] == {"undecodable image": 2}
    for info in (train, val):
        assert sum(info["shard_samples"]) == info["samples"]
        for name, count in zip(info["shards"], info["shard_samples"], strict=True):
            assert count <= 10 and len(read_tar(shards / name)) == count
    # Two workers wrote their own shards; no unfinished temporary file is left.
    assert {n.split("-")[1] for n in train["shards"]} == {"w00", "w01"}
    assert not list(shards.glob("*.tmp"))


def test_shards_hold_every_good_image_with_its_class(folder, shards):
    _, expected = folder
    index = json.loads((shards / "index.json").read_text())
    for split in ("train", "val"):
        samples = [s for name in index["splits"][split]["shards"] for s in read_tar(shards / name)]
        assert Counter(int(s["cls"]) for s in samples) == expected[split]
        assert len({s["__key__"] for s in samples}) == len(samples)
        for s in samples:  # every stored image is a decodable JPEG (the PNG was re-encoded)
            with Image.open(io.BytesIO(s["jpg"])) as img:
                assert img.format == "JPEG"
                img.load()


def test_one_and_two_workers_write_the_same_samples(folder, shards, tmp_path):
    write_imagefolder_shards(folder[0], tmp_path, workers=1, maxcount=10, progress=False)
    one = json.loads((tmp_path / "index.json").read_text())

    def content(root: Path, index: dict) -> dict[str, bytes]:
        return {s["__key__"]: s["jpg"] for n in index["splits"]["train"]["shards"]
                for s in read_tar(root / n)}

    two = json.loads((shards / "index.json").read_text())
    assert content(tmp_path, one) == content(shards, two)


def test_two_ranks_of_two_workers_evaluate_every_image_once(folder, shards):
    _, expected = folder
    labels, count = Counter(), 0
    for rank in range(2):
        for x, y in image_stream(shards, train=False, batch_size=2, rank=rank, world_size=2,
                                 num_workers=2, size=32, resize=36):
            assert x.shape[1:] == (3, 32, 32)
            labels.update(y.tolist())
            count += len(y)
    assert count == 9 and labels == expected["val"]


def test_a_folder_without_classes_is_an_error(tmp_path):
    with pytest.raises(DataSourceError, match="no class sub-folders"):
        write_imagefolder_shards(tmp_path, tmp_path / "out", progress=False)


def test_cli_writes_imagefolder_shards(folder, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "gwtn_dist", "-q", "shards", "imagefolder",
                           str(folder[0]), str(tmp_path / "s"), "--shard-size", "100"],
                          check=False, capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    assert "train: 25 samples in 1 shard(s); skipped 2 (2 undecodable image)" in proc.stdout
    assert "corrupt.jpg" in proc.stderr and "truncated.jpg" in proc.stderr
