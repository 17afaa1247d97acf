"""Data-path benchmark: ``python -m gwtn_dist.benchmarks.data [--out DIR]``.

Makes its own data (a folder of synthetic JPEG photos, a text corpus, Fashion-MNIST-sized
shards), then times on this machine:

- decoded training images/s (JPEG decode + random-resized-crop 224 + flip + normalise) read from
  shards vs from the same folder of files, with 1 and 2 DataLoader workers;
- tokens/s of masked-LM batches read from token shards (load + dynamic masking);
- the Fashion-MNIST training stream of the default config (5k images), ms per batch of 128,
  with the training tars re-read every epoch and kept in memory.

Prints a table that states the machine and writes ``OUT/bench_data.csv``.
"""

from __future__ import annotations

import argparse
import csv
import itertools
import os
import platform
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from ..data import image_transforms as T
from ..data import streams
from ..data.imagefolder import write_imagefolder_shards
from ..data.shards import train_stream, write_image_shards
from ..data.streams import image_stream, text_stream
from ..data.text_shards import write_text_shards


def machine() -> str:
    """CPU model and core count, from /proc/cpuinfo where there is one."""
    model = platform.processor() or "unknown CPU"
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return f"{model}, {os.cpu_count()} logical cores, torch {torch.__version__}"


def make_photos(root: Path, n: int, width: int, height: int, classes: int = 10) -> None:
    """``n`` JPEGs of ``width`` × ``height`` in ``root/train/<class>/``: smooth blobs plus grain,
    which compresses like a photo (tens of kB at quality 90), unlike pure noise."""
    rng = np.random.default_rng(0)
    for i in range(n):
        folder = root / "train" / f"c{i % classes:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        low = rng.integers(0, 255, (height // 25 + 1, width // 25 + 1, 3), dtype=np.uint8)
        img = Image.fromarray(low).resize((width, height), Image.BICUBIC)
        grain = rng.normal(0, 6, (height, width, 3))
        pixels = np.clip(np.asarray(img, dtype=np.float32) + grain, 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"{i:06d}.jpg", quality=90)


class FolderImages(Dataset):
    """The same training transform, reading one file per image: the baseline to beat."""

    def __init__(self, root: Path):
        classes = sorted(p.name for p in (root / "train").iterdir() if p.is_dir())
        self.files = [(p, c) for c, name in enumerate(classes)
                      for p in sorted((root / "train" / name).iterdir())]

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[np.ndarray, int]:
        path, cls = self.files[i]
        return T.train_transform(path.read_bytes(), np.random.default_rng(i)), cls


def _folder_collate(items):
    images = torch.from_numpy(np.stack([x for x, _ in items]))  # (B, 224, 224, 3) uint8
    return T.normalize(images), torch.tensor([y for _, y in items])


def rate(batches, count) -> tuple[float, int]:
    """Items/s over an iterable of batches, timed from the first batch on (worker start-up and
    the first prefetch are excluded); ``count(batch)`` items per batch."""
    it = iter(batches)
    next(it)
    start, items = time.perf_counter(), 0
    for batch in it:
        items += count(batch)
    return items / (time.perf_counter() - start), items


def corpus(path: Path, words: int) -> str:
    """Debian's King James Bible when the ``bible`` command exists, else seeded synthetic text."""
    if shutil.which("bible"):
        path.write_bytes(subprocess.run(["bible", "gen1:1-rev22:21"], check=True,
                                        capture_output=True).stdout)
        return "bible-kjv"
    rng = np.random.default_rng(0)
    vocab = ["".join(rng.choice(list("etaoinshrdlucmfw"), rng.integers(2, 9))) for _ in range(5000)]
    zipf = 1 / np.arange(1, len(vocab) + 1)
    picks = rng.choice(len(vocab), words, p=zipf / zipf.sum())
    paragraphs = [" ".join(vocab[j] for j in picks[i : i + 80]) for i in range(0, words, 80)]
    path.write_text("\n\n".join(paragraphs))
    return f"synthetic ({words} words)"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m gwtn_dist.benchmarks.data", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/bench-data", help="where bench_data.csv goes")
    p.add_argument("--folder", help="an image folder with train/<class>/ to read instead of "
                                    "synthetic photos (e.g. a slice of ImageNet)")
    p.add_argument("--images", type=int, default=2000)
    p.add_argument("--size", type=int, nargs=2, default=[400, 350], metavar=("W", "H"))
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--step-s", type=float, default=0.3,
                   help="an ImageNet training step's seconds per GPU (default 0.3: ResNet50)")
    p.add_argument("--step-images", type=int, default=256,
                   help="images per GPU per step (default 256)")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)  # the workers are the parallelism being measured
    rows: list[dict] = []

    def record(what: str, workers: int, value: float, unit: str, note: str = "") -> None:
        rows.append({"what": what, "workers": workers, "value": round(value, 1), "unit": unit,
                     "per_worker": round(value / max(1, workers), 1), "note": note})
        print(f"{what:<53} {workers:>2} worker(s) {value:>11,.1f} {unit:<6} "
              f"{value / max(1, workers):>10,.1f} /worker  {note}", flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        w, h = args.size
        print(f"machine: {machine()}")
        photos = Path(args.folder) if args.folder else tmp / "photos"
        if not args.folder:
            make_photos(photos, args.images, w, h)
        files = [f for f in photos.glob("train/*/*") if f.is_file()]
        kb = sum(f.stat().st_size for f in files) / len(files) / 1024
        note = (f"{len(files)} files of {photos.name}, {kb:.0f} kB each" if args.folder
                else f"{len(files)} JPEGs {w}x{h}, {kb:.0f} kB each")
        start = time.perf_counter()
        write_imagefolder_shards(photos, tmp / "img", workers=2, progress=False)
        record("write imagefolder shards", 2, len(files) / (time.perf_counter() - start),
               "img/s", note)
        for k in args.workers:
            from_shards = image_stream(tmp / "img", train=True, batch_size=args.batch_size,
                                       num_workers=k, seed=0)
            epoch = itertools.islice(from_shards, from_shards.batches_per_epoch)
            value, _ = rate(epoch, lambda b: len(b[1]))
            record("train images from shards (decode+crop+flip+norm)", k, value, "img/s", note)
            folder = DataLoader(FolderImages(photos), batch_size=args.batch_size,
                                shuffle=True, num_workers=k, collate_fn=_folder_collate,
                                drop_last=True)
            value, _ = rate(folder, lambda b: len(b[1]))
            record("train images from the folder of files", k, value, "img/s", note)

        name = corpus(tmp / "corpus.txt", 800_000)
        start = time.perf_counter()
        index = write_text_shards([tmp / "corpus.txt"], tmp / "txt", seq_len=128,
                                  vocab_size=30522, workers=2, progress=False)
        tokens = sum(s["tokens"] for s in index["splits"].values())
        record("write token shards (train tokenizer, tokenize, pack)", 2,
               tokens / (time.perf_counter() - start), "tok/s", name)
        for k in args.workers:
            loader = text_stream(tmp / "txt", train=True, batch_size=128, num_workers=k)
            epoch = itertools.islice(loader, loader.batches_per_epoch)
            value, _ = rate(epoch, lambda b: b["input_ids"].numel())
            record("MLM batches from token shards (load+mask)", k, value, "tok/s",
                   f"{name}, seq_len 128, batch 128")

        rng = np.random.default_rng(0)
        images = rng.integers(0, 255, (20_000, 28, 28), dtype=np.uint8)
        write_image_shards(tmp / "fmnist", {"train": (images, images[:, 0, 0] % 10)},
                           source="synthetic", classes=[str(i) for i in range(10)],
                           progress=False)
        # The default config's stream: the first 5k images, so an epoch is 39 batches and 150
        # batches re-read the tars about four times; with and without the in-memory tar cache.
        per_batch = {}
        for label, cache_bytes in (("tars re-read every epoch", 0),
                                   ("tars kept in memory", streams.TAR_CACHE_BYTES)):
            streams._tar_cache.clear()
            saved, streams.TAR_CACHE_BYTES = streams.TAR_CACHE_BYTES, cache_bytes
            try:
                stream = train_stream(tmp / "fmnist", batch_size=128, seed=0, limit=5000)
                next(stream)
                start = time.perf_counter()
                for _ in range(150):
                    next(stream)
                per_batch[label] = ms = (time.perf_counter() - start) / 150 * 1000
            finally:
                streams.TAR_CACHE_BYTES = saved
            record(f"Fashion-MNIST 5k training stream, {label}", 0, 128 / ms * 1000, "img/s",
                   f"{ms:.1f} ms per batch of 128")
        ratio = per_batch["tars re-read every epoch"] / per_batch["tars kept in memory"]
        print(f"Fashion-MNIST 5k stream: {ratio:.2f}x the ms per batch when the tars are re-read")

    need = args.step_images / args.step_s
    one = next(r["value"] for r in rows if r["what"].startswith("train images from shards"))
    print(f"a GPU at {args.step_s} s per {args.step_images} images needs {need:,.0f} img/s: "
          f"{need / one:.1f} worker(s) at the measured {one:,.0f} img/s per worker")
    with open(out / "bench_data.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
        f.write(f"# machine: {machine()}\n")
    print(f"wrote {out / 'bench_data.csv'}")


if __name__ == "__main__":
    main()
