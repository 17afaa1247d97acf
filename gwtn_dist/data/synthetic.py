"""Synthetic shards with the true shapes of ImageNet and of Wikipedia token sequences.

A rehearsal of a real-size run (``gwtn rehearse``) needs shards that cost what the real ones
cost to read, decode and batch, without the real data: ``gwtn shards synthetic imagenet OUT``
writes JPEGs of ImageNet's sizes (the long side 500 pixels for most images, 250–500 for the
rest, aspect 0.6–1, about 100 KB each at quality 90) in 1000 classes, in the format of ``gwtn
shards imagefolder`` (train and val splits); ``gwtn shards synthetic wikipedia OUT`` writes
token sequences in the format of ``gwtn shards wikipedia`` (``seq_len`` tokens, BERT's
30,522-token vocabulary, documents of Wikipedia's lengths packed ``[CLS] doc [SEP] doc [SEP]
…`` by the writer's own :class:`~.text_shards.Packer`; train, val and test splits).

The pixels are smooth random fields with noise and the tokens Zipf-distributed ids: nothing
can be learnt from them, only run on. Seeded: the same arguments give the same shards.
"""

from __future__ import annotations

import io
from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image

from .errors import DataSourceError
from .text_shards import SPLIT_RULE, Packer
from .tokenizer import SPECIALS
from .writer import ShardSink, clear_old_shards, merge_reports, split_report, write_index

IMAGENET_CLASSES = 1000
BERT_VOCAB = 30522
# Wikipedia articles in WordPiece tokens: log-normal around ~400, a long tail (mean ~700).
DOC_LOG_MEAN, DOC_LOG_SD = 6.0, 1.0


def synthetic_jpeg(rng: np.random.Generator) -> bytes:
    """One JPEG of an ImageNet photo's size: (H, W) with the long side 500 (3 in 4) or
    250–500, aspect 0.6–1, landscape 3 in 4; a bicubic-upsampled random field plus noise."""
    long = 500 if rng.random() < 0.75 else int(rng.integers(250, 501))
    short = int(long * rng.uniform(0.6, 1.0))
    w, h = (long, short) if rng.random() < 0.75 else (short, long)
    field = rng.integers(0, 256, (max(2, h // 24), max(2, w // 24), 3)).astype(np.uint8)
    img = np.asarray(Image.fromarray(field).resize((w, h), Image.BICUBIC)).astype(np.float32)
    img = np.clip(img + rng.normal(0.0, 13.0, img.shape), 0, 255).astype(np.uint8)  # (H, W, 3)
    out = io.BytesIO()
    Image.fromarray(img).save(out, format="JPEG", quality=90)
    return out.getvalue()


def write_synthetic_images(out: Path | str, *, train: int = 64, val: int = 16,
                           classes: int = IMAGENET_CLASSES, seed: int = 0,
                           maxcount: int = 1000) -> dict:
    """Write ``OUT/{train,val}-w00-<k>.tar`` of (jpg, cls) and ``OUT/index.json`` as
    ``gwtn shards imagefolder`` would; returns the index."""
    _check_counts(train=train, val=val, classes=classes, maxcount=maxcount)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    clear_old_shards(out, ["train", "val"])
    rng = np.random.default_rng(seed)
    sinks = {}
    for split, n in (("train", train), ("val", val)):
        sink = sinks[split] = ShardSink(out, f"{split}-w00", maxcount)
        for i in range(n):
            sink.write({"__key__": f"{split}-{i:08d}", "jpg": synthetic_jpeg(rng),
                        "cls": int(rng.integers(0, classes))})
        sink.close()
    index = merge_reports([split_report(sinks, {})], {
        "source": "synthetic", "format": "imagefolder",
        "classes": [f"class{c:04d}" for c in range(classes)], "seed": seed})
    write_index(out, index)
    return index


def synthetic_document(rng: np.random.Generator, vocab_size: int) -> list[int]:
    """One document's token ids: a log-normal length (Wikipedia's, in WordPiece tokens) of
    Zipf-distributed ids above the five specials."""
    length = int(np.clip(rng.lognormal(DOC_LOG_MEAN, DOC_LOG_SD), 20, 20_000))
    ranks = rng.zipf(1.2, length) - 1  # 0 = the commonest word
    return (len(SPECIALS) + ranks % (vocab_size - len(SPECIALS))).tolist()


def write_synthetic_tokens(out: Path | str, *, train: int = 64, val: int = 8, test: int = 8,
                           seq_len: int = 128, vocab_size: int = BERT_VOCAB, seed: int = 0,
                           maxcount: int = 10_000) -> dict:
    """Write ``OUT/{train,val,test}-w00-<k>.tar`` of ``seq_len``-token sequences and
    ``OUT/index.json`` as ``gwtn shards wikipedia`` would (without a tokenizer.json: there is
    no text to decode); returns the index. Each split gets exactly the sequences asked for."""
    _check_counts(train=train, val=val, test=test, maxcount=maxcount)
    if seq_len < 8 or vocab_size <= len(SPECIALS):
        raise DataSourceError(f"seq_len {seq_len} (need ≥ 8) or vocab_size {vocab_size} "
                              f"(need > {len(SPECIALS)}) too small")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    clear_old_shards(out, ["train", "val", "test"])
    rng = np.random.default_rng(seed)
    ids = {s: i for i, s in enumerate(SPECIALS)}  # [PAD] 0 … [MASK] 4, as the tokenizer has
    dtype = np.uint16 if vocab_size <= 65535 else np.int32
    sinks, tokens = {}, Counter()
    for split, n in (("train", train), ("val", val), ("test", test)):
        sink = sinks[split] = ShardSink(out, f"{split}-w00", maxcount)
        packer = Packer(seq_len, ids["[CLS]"], ids["[SEP]"], ids["[PAD]"], dtype)
        written = 0
        while written < n:
            doc = synthetic_document(rng, vocab_size)
            for seq in packer.add(doc):
                if written < n:
                    sink.write({"__key__": f"{split}-w00-{written:09d}", "ids.npy": seq})
                    tokens[split] += int((seq >= len(SPECIALS)).sum())
                    written += 1
        sink.close()
    report = split_report(sinks, {})
    for split in sinks:
        report[split]["tokens"] = tokens[split]
    meta = {"source": ["synthetic"], "format": "tokens", "seq_len": seq_len, "tokenizer": None,
            "vocab_size": vocab_size, "special_ids": ids, "val_every": None, "test_every": None,
            "split_rule": SPLIT_RULE}  # splits of fixed sizes, not one document in N
    index = merge_reports([report], meta)
    for split, entry in index["splits"].items():
        entry["tokens"] = tokens[split]
    write_index(out, index)
    return index


def _check_counts(**counts: int) -> None:
    for name, n in counts.items():
        if n < 1:
            raise DataSourceError(f"--{name.replace('_', '-')}: must be at least 1, got {n}")
