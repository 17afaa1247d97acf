"""Damaged shards lose no data silently: every tar is read to the count its index records, the
shortfall of a training split is counted, and an evaluation split read short of its index (or a
tar swapped for another's) is refused with one line naming the tar and exit 4."""

from __future__ import annotations

import json
import shutil
import tarfile
from collections import Counter
from pathlib import Path

import pytest

from gwtn_dist.cli import EXIT_CHECKPOINT, main
from gwtn_dist.data.errors import DamagedDataError
from gwtn_dist.data.streams import ShardLoader, ShardStream, read_piece
from gwtn_dist.data.writer import ShardSink, merge_reports, split_report, write_index
from tests.test_pipeline import fast_args

GARBAGE = bytes((i * 7 + 3) % 251 for i in range(65536))  # 64 KB that is no tar header


def garbage_mid_tar(tar: Path) -> None:
    """64 KB of garbage over the header of the middle member: Python's tarfile takes the bad
    header for the end of the archive and raises nothing (what hid the damage)."""
    with tarfile.open(tar) as tf:
        members = list(tf)
    at = members[len(members) // 2].offset
    data = bytearray(tar.read_bytes())
    data[at:at + len(GARBAGE)] = GARBAGE[:len(data) - at]
    tar.write_bytes(bytes(data))


def truncate(tar: Path) -> None:
    """The tar cut 20 kB before its end (a copy that stopped)."""
    tar.write_bytes(tar.read_bytes()[:-20_000])


def damaged_copy(shard_dir: Path, out: Path, split: str, how: str) -> Path:
    """A copy of the fixture's shards (train: 1200, test: 300 samples, one tar each) with
    ``split``'s tar damaged ``how``: garbage, truncated, or swapped (for the other split's)."""
    shutil.copytree(shard_dir, out)
    tar = out / f"{split}-00000.tar"
    if how == "garbage":
        garbage_mid_tar(tar)
    elif how == "truncated":
        truncate(tar)
    else:
        other = out / f"{'test' if split == 'train' else 'train'}-00000.tar"
        tar.write_bytes(other.read_bytes())
    return out


def wide(tmp_path: Path, shards: Path, capsys, *extra: str) -> tuple[int, str, dict | None]:
    """``gwtn wide`` (3 steps) on ``shards``: exit code, stderr, stage.json (None if absent)."""
    run_dir = tmp_path / "run"
    code = main(["-q", "wide", *fast_args(run_dir, shards, "wide.steps=3", "eval_every=0",
                                          *extra)])
    err = capsys.readouterr().err
    record = run_dir / "wide" / "stage.json"
    return code, err, json.loads(record.read_text()) if record.is_file() else None


def one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_a_tar_that_ends_early_without_an_error_is_counted(shard_dir, tmp_path):
    tar = tmp_path / "test-00000.tar"
    shutil.copy(shard_dir / "test-00000.tar", tar)
    garbage_mid_tar(tar)
    skipped = Counter()
    read = sum(1 for _ in read_piece(str(tar), 0, 300, skipped, count=300))
    assert read == 150 and skipped == {"short tar": 1, "missing samples": 150}
    skipped = Counter()
    assert sum(1 for _ in read_piece(str(tar), 0, 300, skipped)) == 150  # no count: not known
    assert skipped == {}


@pytest.mark.parametrize("how", ["garbage", "truncated"])
def test_damaged_training_data_is_counted_in_skipped_samples(shard_dir, tmp_path, capsys, how):
    shards = damaged_copy(shard_dir, tmp_path / "shards", "train", how)
    # 40 steps of 32: past the end of the 1200 samples, where the tar is short.
    code, err, record = wide(tmp_path, shards, capsys, "data.val_samples=0", "wide.steps=40")
    assert code == 0, err
    assert record["skipped_samples"]["missing samples"] > 0
    assert set(record["skipped_samples"]) <= {"missing samples", "short tar", "truncated tar"}
    assert record["test_samples"] == 300


@pytest.mark.parametrize("split, how", [("train", "garbage"), ("test", "garbage"),
                                        ("test", "truncated")])
def test_an_evaluation_split_read_short_is_refused_naming_the_tar(shard_dir, tmp_path, capsys,
                                                                   split, how):
    """A damaged test tar stops the test score; a damaged training tar the validation score
    (the validation split is carved out of train; a training tar cut near its end loses none
    of the 100 validation samples, and trains, counted, as above). ``data.eval_missing_ok``
    lets it through."""
    shards = damaged_copy(shard_dir, tmp_path / "shards", split, how)
    code, err, _ = wide(tmp_path, shards, capsys, "data.val_samples=100")
    line = one_line(err)
    assert code == EXIT_CHECKPOINT, err
    assert line.startswith(f"gwtn: error: {shards / f'{split}-00000.tar'} is damaged")
    assert ("the validation split" if split == "train" else "the test split") in line
    assert "data.eval_missing_ok" in line

    code, err, record = wide(tmp_path, shards, capsys, "data.val_samples=100",
                             "data.eval_missing_ok=0.9", "resume=true")
    assert code == 0, err
    read = record["val_samples"] if split == "train" else record["test_samples"]
    assert 0 < read < (100 if split == "train" else 300)


@pytest.mark.parametrize("split", ["train", "test"])
def test_a_tar_swapped_for_another_splits_is_refused(shard_dir, tmp_path, capsys, split):
    """A test tar in place of the training one would be trained on; a training tar in place
    of the test one would be scored as the test split."""
    shards = damaged_copy(shard_dir, tmp_path / "shards", split, "swapped")
    code, err, _ = wide(tmp_path, shards, capsys, "data.val_samples=0")
    line = one_line(err)
    assert code == EXIT_CHECKPOINT
    assert line.startswith(f"gwtn: error: {shards / f'{split}-00000.tar'} holds ")
    assert "another split" in line


@pytest.mark.parametrize("text, words", [
    ("null", "not a shard index"), ("{", "not valid JSON"), ("[1, 2]", "not a shard index"),
    ('{"splits": {"train": {"shards": ["../train-00000.tar"], "shard_samples": [1200]}}}',
     "'../train-00000.tar', not a file in the folder"),
    ('{"splits": {"train": {"shards": ["train-00000.tar"], "shard_samples": [-1]}}}',
     "no sample count"),
    (('{"splits": {"train": {"shards": ["train-00000.tar"], "shard_samples": [1200], '
      '"labels": ["a"]}}}'), "labels that are not class numbers"),
])
def test_a_malformed_index_is_one_line_naming_it(shard_dir, tmp_path, capsys, text, words):
    shards = tmp_path / "shards"
    shutil.copytree(shard_dir, shards)
    (shards / "index.json").write_text(text)
    code, err, _ = wide(tmp_path, shards, capsys)
    line = one_line(err)
    assert code == EXIT_CHECKPOINT and str(shards / "index.json") in line and words in line


def test_an_index_that_is_not_utf8_is_one_line(shard_dir, tmp_path, capsys):
    shards = tmp_path / "shards"
    shutil.copytree(shard_dir, shards)
    (shards / "index.json").write_bytes(b'{"splits": "\xff\xfe"}')
    code, err, _ = wide(tmp_path, shards, capsys)
    assert code == EXIT_CHECKPOINT and "not valid JSON" in one_line(err)


# Per-rank streams (image folders, token shards): their own val split.


def _key(sample, rng):
    return sample["__key__"]


def _keys(items, rng):
    return list(items)


@pytest.fixture
def two_splits(tmp_path) -> Path:
    """train: 2 tars of 40; val: 2 tars of 30 (keys ``<split>-<n>``), with an index.json."""
    out = tmp_path / "shards"
    out.mkdir()
    reports = []
    for split, per in (("train", 40), ("val", 30)):
        sink = ShardSink(out, f"{split}-w00", maxcount=per)
        for n in range(2 * per):
            sink.write({"__key__": f"{split}-{n:04d}", "txt": str(n)})
        sink.close()
        reports.append(split_report({split: sink}, {}))
    write_index(out, merge_reports(reports, {"format": "test"}))
    return out


def keys(folder: Path, split: str, *, train: bool, workers: int = 0,
         missing_ok: float = 0.0) -> ShardLoader:
    return ShardLoader(ShardStream(folder, split, batch_size=4, decode=_key, collate=_keys,
                                   train=train, shuffle_buffer=4, eval_missing_ok=missing_ok),
                       workers)


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("how", ["garbage", "truncated"])
def test_a_damaged_val_tar_stops_its_evaluation_in_one_line(two_splits, workers, how):
    tar = two_splits / "val-w00-00000.tar"
    (garbage_mid_tar if how == "garbage" else truncate)(tar)
    with pytest.raises(DamagedDataError, match="data.eval_missing_ok") as caught:
        [k for batch in keys(two_splits, "val", train=False, workers=workers) for k in batch]
    assert str(caught.value).startswith(f"{tar} holds ")
    assert "\n" not in str(caught.value) and "Traceback" not in str(caught.value)
    tolerant = keys(two_splits, "val", train=False, workers=workers, missing_ok=0.9)
    read = [k for batch in tolerant for k in batch]
    assert 30 < len(read) < 60 and len(set(read)) == len(read)


def test_a_damaged_training_tar_is_read_as_far_as_it_goes_and_counted(two_splits):
    garbage_mid_tar(two_splits / "train-w00-00000.tar")
    loader = keys(two_splits, "train", train=True)
    for _ in range(loader.batches_per_epoch):
        next(loader)
    # Each read of the tar counts it: a second pass fills the epoch's quota the loss ate into.
    assert loader.skipped["short tar"] >= 1
    assert loader.skipped["missing samples"] == 20 * loader.skipped["short tar"]


@pytest.mark.parametrize("train", [True, False])
def test_a_tar_with_more_samples_than_its_index_is_refused(two_splits, train):
    """The val tar replaced by a training one (40 samples where the index lists 30)."""
    tar = two_splits / "val-w00-00000.tar"
    tar.write_bytes((two_splits / "train-w00-00000.tar").read_bytes())
    loader = keys(two_splits, "val", train=train)
    with pytest.raises(DamagedDataError, match=f"{tar} holds more than the 30 samples"):
        for _ in range(20):
            next(iter(loader)) if train else list(loader)
