"""Read MNIST-format idx files (Fashion-MNIST as Debian's ``dataset-fashion-mnist`` ships it),
and write them as webdataset shards (``gwtn shards fashion-mnist``)."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np

from .errors import DataSourceError
from .shards import write_image_shards

DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
SPLIT_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
           "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]


def _find(src: Path, stem: str) -> Path:
    for name in (stem + ".gz", stem, stem.replace("-idx", ".idx") + ".gz"):
        if (src / name).is_file():
            return src / name
    raise DataSourceError(
        f"{src / (stem + '.gz')} not found. Install Debian's dataset-fashion-mnist "
        f"(apt-get install dataset-fashion-mnist) or pass --src DIR with MNIST-format idx files "
        f"({stem}[.gz] for both splits)."
    )


def read_idx(path: Path) -> np.ndarray:
    """Parse one idx file (optionally gzipped) into a uint8 array of its declared shape."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as exc:
        raise DataSourceError(f"{path}: cannot read ({exc})") from exc
    if len(data) < 4:
        raise DataSourceError(f"{path}: too short to be an idx file")
    zero, dtype_code, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype_code != 0x08:
        raise DataSourceError(f"{path}: not an unsigned-byte idx file (magic {data[:4].hex()})")
    dims = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(dims)):
        raise DataSourceError(f"{path}: header says {dims} but holds {body.size} bytes")
    return body.reshape(dims)


def load_split(src: Path | str | None, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Images (N, 28, 28) uint8 and labels (N,) uint8 of ``split`` ('train' or 'test')."""
    src = Path(src) if src is not None else DEBIAN_DIR
    if not src.is_dir():
        raise DataSourceError(
            f"{src} is not a folder. Install Debian's dataset-fashion-mnist "
            f"(apt-get install dataset-fashion-mnist) or pass --src DIR."
        )
    image_stem, label_stem = SPLIT_FILES[split]
    images = read_idx(_find(src, image_stem))
    labels = read_idx(_find(src, label_stem))
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise DataSourceError(
            f"{src}: {split} images {images.shape} and labels {labels.shape} do not match"
        )
    return images, labels


def write_fashion_mnist(out: Path, src: Path | None, progress: bool = True) -> dict:
    """Write Fashion-MNIST's train and test splits from the idx files in ``src`` (None: Debian's
    package) as image shards in ``out``; returns the index (see ``shards.write_image_shards``)."""
    splits = {split: load_split(src, split) for split in ("train", "test")}
    return write_image_shards(out, splits, source="fashion-mnist", classes=CLASSES,
                              progress=progress)
