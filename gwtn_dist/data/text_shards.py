"""Text documents → tokenized, packed sequences in webdataset shards.

Each sample is ``{"__key__": …, "ids.npy": (seq_len,) uint16 (int32 for vocabularies over 65535)}``.
Documents are tokenized without specials and packed back to back, BERT style: every sequence
starts with ``[CLS]``, every document ends with ``[SEP]``, a long document continues in the next
sequence, and only the last sequence of a worker is padded with ``[PAD]``. ``tokens`` in the
index counts text tokens (specials not included). The attention mask is
``ids != [PAD]``; ``[SEP]`` marks document boundaries.

Documents (counted over all inputs, skipped ones included) go whole to one split each
(:func:`split_of`, by a hash of the document's number): one in ``val_every`` to ``val`` (the
validation split: curves and choices), one in ``test_every`` to ``test`` (read once, for the
report), the others to ``train``. No document is in two splits, so no sequence of one split shares
text with another.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from tqdm import tqdm

from .documents import cleaner, read_documents
from .errors import DataSourceError
from .tokenizer import load_tokenizer, special_ids, train_tokenizer
from .writer import (
    ShardSink,
    clear_old_shards,
    merge_reports,
    run_workers,
    split_report,
    write_index,
)

log = logging.getLogger("gwtn")
TOKENIZER_FILE = "tokenizer.json"
ENCODE_BATCH = 256


class Packer:
    """Packs token lists into fixed-length sequences: ``[CLS] doc [SEP] doc [SEP] …``."""

    def __init__(self, seq_len: int, cls_id: int, sep_id: int, pad_id: int, dtype: np.dtype):
        self.seq_len, self.dtype = seq_len, dtype
        self.cls, self.sep, self.pad = cls_id, sep_id, pad_id
        self._cur: list[int] = [cls_id]

    def add(self, ids: list[int]) -> Iterator[np.ndarray]:
        """Append one document; yields the sequences it completes, each (seq_len,)."""
        self._cur += ids
        self._cur.append(self.sep)
        while len(self._cur) >= self.seq_len:
            yield np.asarray(self._cur[: self.seq_len], dtype=self.dtype)
            self._cur = [self.cls, *self._cur[self.seq_len:]]

    def flush(self) -> Iterator[np.ndarray]:
        """The last, padded sequence (nothing if it would hold no token)."""
        if len(self._cur) > 1:
            pad = [self.pad] * (self.seq_len - len(self._cur))
            yield np.asarray(self._cur + pad, dtype=self.dtype)
        self._cur = [self.cls]


def iter_texts(paths: list[str]) -> Iterator[str]:
    """Every usable document of ``paths`` as plain text (what the tokenizer is trained on)."""
    for path in paths:
        clean = cleaner(path)
        for text, _ in read_documents(path):
            if text is not None and (text := clean(text)):
                yield text


# Named in index.json: shards split by the older rule (a document's number modulo the period)
# have no such field, and a teacher cached on them is not reused for these (teacher_cache).
SPLIT_RULE = "blake2b-of-document-number"


def split_of(doc: int, val_every: int, test_every: int = 0) -> str:
    """The split of document number ``doc``: ``val`` for one document in ``val_every``, ``test``
    for one in ``test_every``, else ``train`` (0 = no such split).

    Which ones is decided by a hash of the number, not by its remainder: a corpus whose
    documents alternate (the Bible as ``bible`` prints it: a "Genesis 1" heading, then the
    chapter) would otherwise send every heading, and no text, to one split. ``u`` is the
    document's uniform draw in [0, 1); val takes ``u < 1/val_every`` and test the next
    ``1/test_every``, so no document is in two splits and each split gets its share.
    """
    digest = hashlib.blake2b(doc.to_bytes(8, "little"), digest_size=8).digest()
    u = int.from_bytes(digest, "little") / 2**64
    val_share = 1 / val_every if val_every else 0.0
    if u < val_share:
        return "val"
    if test_every and u < val_share + 1 / test_every:
        return "test"
    return "train"


def split_names(val_every: int, test_every: int) -> list[str]:
    """The splits a writer with these periods produces."""
    return ["train"] + ["val"] * bool(val_every) + ["test"] * bool(test_every)


def _write_worker(paths: list[str], out: str, seq_len: int, val_every: int, test_every: int,
                  maxcount: int, progress: bool, worker: int, workers: int) -> dict:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # the processes are the parallelism
    tok = load_tokenizer(Path(out) / TOKENIZER_FILE)
    ids = special_ids(tok)
    specials = list(ids.values())
    dtype = np.uint16 if tok.get_vocab_size() <= 65535 else np.int32
    splits = split_names(val_every, test_every)
    sinks = {s: ShardSink(Path(out), f"{s}-w{worker:02d}", maxcount) for s in splits}
    packers = {s: Packer(seq_len, ids["[CLS]"], ids["[SEP]"], ids["[PAD]"], dtype) for s in splits}
    pending: dict[str, list[str]] = {s: [] for s in splits}
    skipped = {s: Counter() for s in splits}
    tokens, written = Counter(), Counter()

    def emit(split: str, flush: bool = False) -> None:
        texts, pending[split] = pending[split], []
        packer = packers[split]
        for enc in tok.encode_batch(texts, add_special_tokens=False) if texts else []:
            for seq in packer.add(enc.ids):
                write(split, seq)
        if flush:
            for seq in packer.flush():
                write(split, seq)

    def write(split: str, seq: np.ndarray) -> None:
        key = f"{split}-w{worker:02d}-{written[split]:09d}"
        sinks[split].write({"__key__": key, "ids.npy": seq})
        written[split] += 1
        tokens[split] += int((~np.isin(seq, specials)).sum())

    doc = -1
    bar = tqdm(desc=f"docs w{worker}", disable=not progress, unit="doc", position=worker,
               mininterval=1.0)
    for path in paths:
        clean = cleaner(path)
        for text, reason in read_documents(path):
            doc += 1
            if doc % workers != worker:
                continue
            split = split_of(doc, val_every, test_every)
            bar.update()
            if text is not None and not (text := clean(text)):
                reason = "empty after cleaning"
            if reason is not None:
                skipped[split][reason] += 1
                continue
            pending[split].append(text)
            if len(pending[split]) >= ENCODE_BATCH:
                emit(split)
    bar.close()
    for split in splits:
        emit(split, flush=True)
        sinks[split].close()
    report = split_report(sinks, skipped)
    for split in splits:
        report[split]["tokens"] = tokens[split]
    return report


def write_text_shards(paths: list[str | Path], out: Path | str, *, seq_len: int = 128,
                      tokenizer: Path | str | None = None, vocab_size: int = 30522,
                      val_every: int = 100, test_every: int = 100, workers: int = 1,
                      maxcount: int = 10_000, progress: bool = True) -> dict:
    """Write ``OUT/{train,val,test}-w<worker>-<k>.tar``, ``OUT/tokenizer.json`` and
    ``OUT/index.json``.

    ``val_every``/``test_every``: the periods of the held-out splits, whole documents
    (:func:`split_of`; 0 = no such split). Without ``tokenizer`` a WordPiece tokenizer of
    ``vocab_size`` is trained on the inputs first.
    """
    paths = [str(p) for p in paths]
    missing = [p for p in paths if not Path(p).is_file()]
    if missing:
        raise DataSourceError(f"input files not found: {missing}")
    if seq_len < 8:
        raise DataSourceError(f"seq_len {seq_len} is too short for packed sequences (need ≥ 8)")
    held_out = (1 / val_every if val_every > 0 else 0) + (1 / test_every if test_every > 0 else 0)
    if val_every < 0 or test_every < 0 or held_out >= 1:
        raise DataSourceError(f"val_every {val_every} / test_every {test_every}: give 0 (no "
                              f"such split) or N for one document in N, leaving some for train")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if tokenizer is None:
        log.info("training a WordPiece tokenizer (vocab %d) on %d file(s)", vocab_size, len(paths))
        train_tokenizer(lambda: iter_texts(paths), vocab_size, out / TOKENIZER_FILE, progress)
    elif Path(tokenizer).resolve() != (out / TOKENIZER_FILE).resolve():
        load_tokenizer(tokenizer)
        shutil.copyfile(tokenizer, out / TOKENIZER_FILE)
    tok = load_tokenizer(out / TOKENIZER_FILE)
    clear_old_shards(out, ["train", "val", "test"])  # also a test split a rerun does not write
    reports = run_workers(_write_worker, (paths, str(out), seq_len, val_every, test_every,
                                          maxcount, progress), workers)
    meta = {"source": [Path(p).name for p in paths], "format": "tokens", "seq_len": seq_len,
            "tokenizer": TOKENIZER_FILE, "vocab_size": tok.get_vocab_size(),
            "special_ids": special_ids(tok), "val_every": val_every, "test_every": test_every,
            "split_rule": SPLIT_RULE}
    index = merge_reports(reports, meta)
    for split, entry in index["splits"].items():
        entry["tokens"] = sum(r[split]["tokens"] for r in reports if split in r)
    write_index(out, index)
    for split in ("val", "test"):
        if split in index["splits"] and not index["splits"][split]["samples"]:
            log.warning("%s: the %s split is empty (too few documents for its period)", out, split)
    return index
