"""An ImageNet-style folder of images → webdataset shards of (jpg, cls).

``SRC/train/<class>/*.jpg`` and ``SRC/val/<class>/*.jpg`` (either may be missing; a folder of
class sub-folders with neither is read as ``train``). The class index is the sorted union of the
class folder names. Each split is written in a seeded random order, so every shard holds a mix of
classes and a reader's shuffle buffer does not have to undo a class-sorted file order.

Memory: the file *names* of a split are listed (about 100 bytes per image); image bytes are
streamed one at a time.
"""

from __future__ import annotations

import io
import logging
import os
from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from .errors import DataSourceError
from .writer import (
    ShardSink,
    clear_old_shards,
    merge_reports,
    run_workers,
    split_report,
    write_index,
)

log = logging.getLogger("gwtn")
SPLITS = ("train", "val")


def find_splits(src: Path) -> dict[str, Path]:
    """The split folders of ``src``: its train/val sub-folders, or ``src`` itself as train."""
    if not src.is_dir():
        raise DataSourceError(f"{src} is not a folder of class sub-folders")
    splits = {s: src / s for s in SPLITS if (src / s).is_dir()}
    return splits or {"train": src}


def find_classes(splits: dict[str, Path]) -> list[str]:
    """Sorted class names: every sub-folder of any split folder."""
    classes = sorted({e.name for folder in splits.values() for e in os.scandir(folder)
                      if e.is_dir() and not e.name.startswith(".")})
    if not classes:
        raise DataSourceError(f"no class sub-folders in {', '.join(map(str, splits.values()))}")
    return classes


def list_split(folder: Path, classes: list[str], seed: int) -> list[tuple[str, int]]:
    """(relative path, class id) of every file of a split, in a seeded random order."""
    files = []
    for cls, name in enumerate(classes):
        if (folder / name).is_dir():
            files += [(f"{name}/{f}", cls) for f in sorted(os.listdir(folder / name))
                      if not f.startswith(".") and (folder / name / f).is_file()]
    order = np.random.default_rng(seed).permutation(len(files))
    return [files[i] for i in order]


def jpeg_bytes(data: bytes) -> bytes:
    """``data`` if it is a JPEG that decodes completely, else the image re-encoded as JPEG.

    Raises OSError (or PIL's errors) for bytes that are not a decodable image.
    """
    with Image.open(io.BytesIO(data)) as img:
        if img.format == "JPEG":
            # Decoding at 1/8 scale still reads every entropy-coded segment, so truncation is
            # caught, at a fraction of the cost of a full decode.
            img.draft("RGB", (max(1, img.width // 8), max(1, img.height // 8)))
            img.load()
            return data
        out = io.BytesIO()
        img.convert("RGB").save(out, format="JPEG", quality=95)
        return out.getvalue()


def _write_worker(src: str, out: str, classes: list[str], seed: int, maxcount: int,
                  progress: bool, worker: int, workers: int) -> dict:
    sinks, skipped = {}, {}
    for split, folder in find_splits(Path(src)).items():
        files = list_split(folder, classes, seed)
        sink = sinks[split] = ShardSink(Path(out), f"{split}-w{worker:02d}", maxcount)
        skipped[split] = Counter()
        mine = range(worker, len(files), workers)
        for i in tqdm(mine, desc=f"{split} w{worker}", disable=not progress, unit="img",
                      position=worker, mininterval=1.0):
            rel, cls = files[i]
            try:
                data = jpeg_bytes((folder / rel).read_bytes())
            except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
                log.warning("skipping %s: undecodable image (%s)", folder / rel, exc)
                skipped[split]["undecodable image"] += 1
                continue
            sink.write({"__key__": f"{split}-{i:08d}", "jpg": data, "cls": cls})
        sink.close()
    return split_report(sinks, skipped)


def write_imagefolder_shards(src: Path | str, out: Path | str, *, workers: int = 1,
                             maxcount: int = 1000, seed: int = 0,
                             progress: bool = True) -> dict:
    """Write ``OUT/<split>-w<worker>-<k>.tar`` and ``OUT/index.json``; returns the index."""
    src, out = Path(src), Path(out)
    splits = find_splits(src)
    classes = find_classes(splits)
    out.mkdir(parents=True, exist_ok=True)
    clear_old_shards(out, list(splits))
    reports = run_workers(_write_worker, (str(src), str(out), classes, seed, maxcount, progress),
                          workers)
    index = merge_reports(reports, {"source": str(src.name), "format": "imagefolder",
                                    "classes": classes, "seed": seed})
    write_index(out, index)
    return index
