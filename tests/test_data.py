"""Data path: idx files → webdataset shards → deterministic, resumable batches."""

from __future__ import annotations

import gzip
import json

import pytest
import torch

from gwtn_dist.data.fashion_mnist import DataSourceError, load_split, read_idx
from gwtn_dist.data.shards import augment, eval_batches, shard_urls, train_stream
from gwtn_dist.data.streams import read_index


def test_index_counts_match_the_source(shard_dir, idx_dir):
    index = json.loads((shard_dir / "index.json").read_text())
    images, _ = load_split(idx_dir, "train")
    assert index["splits"]["train"]["samples"] == len(images) == 1200
    assert index["splits"]["test"]["samples"] == 300
    assert index["splits"]["train"]["skipped"] == 0
    assert sum(index["splits"]["train"]["shard_samples"]) == 1200
    assert all((shard_dir / name).is_file() for name in index["splits"]["train"]["shards"])


def test_eval_visits_every_test_sample_once_in_order(shard_dir, idx_dir):
    images, labels = load_split(idx_dir, "test")
    seen_x, seen_y = zip(*eval_batches(shard_dir, batch_size=64), strict=True)
    x, y = torch.cat(seen_x), torch.cat(seen_y)
    assert x.shape == (300, 1, 28, 28) and x.dtype == torch.uint8
    assert torch.equal(x[:, 0], torch.from_numpy(images.copy()))
    assert torch.equal(y, torch.from_numpy(labels.copy()).long())
    limited = torch.cat([b[1] for b in eval_batches(shard_dir, batch_size=64, limit=100)])
    assert torch.equal(limited, y[:100])


def _write_constant_shards(folder, split: str, value: int, count: int) -> None:
    """(Re)write ``folder`` with one split of ``count`` 4×4 images, every pixel ``value``."""
    import numpy as np

    from gwtn_dist.data.shards import write_image_shards

    images = np.full((count, 4, 4), value, dtype=np.uint8)
    write_image_shards(folder, {split: (images, np.arange(count) % 2)}, "test", ["a", "b"],
                       progress=False)


def test_a_split_read_again_comes_from_memory_until_its_shards_are_rewritten(tmp_path):
    def write(value: int) -> None:
        _write_constant_shards(tmp_path, "test", value, count=10)

    write(1)
    first = [x for x, _ in eval_batches(tmp_path, batch_size=4)]
    assert [len(x) for x in first] == [4, 4, 2] and all(int(x.max()) == 1 for x in first)
    first[0].fill_(9)  # a caller changing its batch must not change what the next pass reads
    assert all(int(x.max()) == 1 for x, _ in eval_batches(tmp_path, batch_size=4))
    write(2)  # same folder, new files: read again, not served from memory
    assert all(int(x.max()) == 2 for x, _ in eval_batches(tmp_path, batch_size=4))


def test_training_stream_is_deterministic_and_covers_an_epoch(shard_dir):
    a = train_stream(shard_dir, batch_size=100, seed=3, shuffle_buffer=500)
    b = train_stream(shard_dir, batch_size=100, seed=3, shuffle_buffer=500)
    c = train_stream(shard_dir, batch_size=100, seed=4, shuffle_buffer=500)
    first = [next(a) for _ in range(12)]  # exactly one epoch of 1200
    assert a.position == {"epoch": 0, "batch": 12, "skipped": {}}
    labels = torch.cat([y for _, y in first])
    assert len(labels) == 1200
    # Every training image once per epoch: compare sorted pixel sums with the source.
    sums = torch.cat([x.flatten(1).sum(1) for x, _ in first]).sort().values
    all_x = torch.cat([x for x, _ in eval_batches(shard_dir, 500, split="train")])
    assert torch.equal(sums, all_x.flatten(1).sum(1).sort().values)
    second = [next(b) for _ in range(12)]
    assert all(torch.equal(x1, x2) for (x1, _), (x2, _) in zip(first, second, strict=True))
    assert not torch.equal(first[0][0], next(c)[0])
    next_epoch = next(a)
    assert a.position == {"epoch": 1, "batch": 1, "skipped": {}}
    assert not torch.equal(next_epoch[0], first[0][0])  # a new order every epoch


def test_training_tars_kept_in_memory_give_the_batches_read_from_disk(shard_dir, monkeypatch):
    from gwtn_dist.data import streams

    def three_epochs() -> list[tuple[torch.Tensor, torch.Tensor]]:
        stream = train_stream(shard_dir, batch_size=100, seed=5, shuffle_buffer=300)
        return [next(stream) for _ in range(36)]  # 12 batches per epoch

    monkeypatch.setattr(streams, "_tar_cache", {})
    monkeypatch.setattr(streams, "TAR_CACHE_BYTES", 0)  # nothing kept: every epoch from disk
    from_disk = three_epochs()
    assert streams._tar_cache == {}
    monkeypatch.setattr(streams, "TAR_CACHE_BYTES", 1 << 30)
    cached = three_epochs()
    urls = set(shard_urls(shard_dir, "train"))
    assert {key[0] for key in streams._tar_cache} == urls  # every training tar kept
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
               for a, b in zip(from_disk, cached, strict=True))


def test_a_rewritten_training_tar_is_read_again_not_served_from_memory(tmp_path):
    from gwtn_dist.data import streams

    def epoch_and_a_batch_max() -> int:
        # 3 batches of 10 out of 20 images: epoch 0 reads the tar to its end, so it is kept.
        stream = train_stream(tmp_path, batch_size=10, seed=0, shuffle_buffer=10)
        return max(int(next(stream)[0].max()) for _ in range(3))

    _write_constant_shards(tmp_path, "train", 1, count=20)
    assert epoch_and_a_batch_max() == 1
    assert any(key[0].startswith(str(tmp_path)) for key in streams._tar_cache)  # it was kept
    _write_constant_shards(tmp_path, "train", 3, count=20)
    assert epoch_and_a_batch_max() == 3


def _webdataset_order(folder, seed: int, epoch: int, buffer: int, bound: int,
                      exclude: frozenset[int], batch_size: int) -> list[list[int]]:
    """An epoch's batches of sample indices as webdataset's own pipeline orders them: the
    reference the global stream must keep (Fashion-MNIST's published numbers were measured
    with this pipeline)."""
    import random

    import webdataset as wds

    shuffle_seed = random.Random(seed * 1_000_003 + epoch).randrange(2**31)
    urls = shard_urls(folder, "train", bound)

    def index(sample) -> int:
        return int(sample["__key__"].rsplit("-", 1)[1])

    pipe = wds.DataPipeline(
        wds.SimpleShardList(urls), wds.shuffle(len(urls), initial=len(urls), seed=shuffle_seed),
        wds.tarfile_to_samples(),
        wds.select(lambda s: index(s) < bound and index(s) not in exclude),
        wds.shuffle(buffer, initial=buffer, seed=shuffle_seed + 1), wds.map(index),
        wds.batched(batch_size, collation_fn=list, partial=False))
    return list(pipe)


def test_the_global_stream_orders_an_epoch_as_webdatasets_pipeline_does(tmp_path, monkeypatch):
    import numpy as np

    from gwtn_dist.data import shards

    monkeypatch.setattr(shards, "SHARD_SIZE", 60)  # 250 images → 5 shards: their order shuffles
    index = np.arange(250)
    images = np.zeros((250, 4, 4), dtype=np.uint8)
    images[:, 0, 0], images[:, 0, 1] = index // 256, index % 256  # each image names its index
    shards.write_image_shards(tmp_path, {"train": (images, index % 2)}, "test", ["a", "b"],
                              progress=False)
    exclude = frozenset(range(3, 250, 7))
    stream = train_stream(tmp_path, batch_size=16, seed=5, shuffle_buffer=40, limit=150,
                          exclude=exclude)
    bound = 175  # the first 175 indices hold 150 not excluded (25 of them are)
    assert len([i for i in range(bound) if i not in exclude]) == 150
    for epoch in range(2):
        expected = _webdataset_order(tmp_path, 5, epoch, 40, bound, exclude, 16)
        assert len(expected) == 9
        got = [next(stream)[0][:, 0, 0] for _ in expected]  # (16, 4) uint8 each
        assert [(x[:, 0].long() * 256 + x[:, 1].long()).tolist() for x in got] == expected


def test_shards_whose_keys_hold_no_index_are_refused_in_one_line(tmp_path):
    import io
    import tarfile

    from gwtn_dist.data.errors import DataSourceError

    _write_constant_shards(tmp_path, "train", 1, count=20)
    shard = tmp_path / read_index(tmp_path)["splits"]["train"]["shards"][0]
    with tarfile.open(shard) as tf:
        members = [(m, tf.extractfile(m).read()) for m in tf]
    with tarfile.open(shard, "w") as tf:  # keys "image<i>": written by some other tool
        for m, data in members:
            m.name = m.name.replace("train-", "image")
            tf.addfile(m, io.BytesIO(data))
    stream = train_stream(tmp_path, batch_size=10, seed=0, shuffle_buffer=10,
                          exclude=frozenset({3}))
    with pytest.raises(DataSourceError, match="has no index"):
        next(stream)


def test_seek_resumes_the_exact_batch(shard_dir):
    a = train_stream(shard_dir, batch_size=64, seed=0, shuffle_buffer=300)
    for _ in range(23):  # crosses an epoch boundary (18 batches per epoch)
        next(a)
    pos = a.position
    expected = next(a)
    b = train_stream(shard_dir, batch_size=64, seed=0, shuffle_buffer=300)
    b.seek(pos)
    got = next(b)
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])


def test_train_samples_limit_uses_only_the_first_samples(shard_dir):
    s = train_stream(shard_dir, batch_size=50, seed=0, shuffle_buffer=100, limit=200)
    batches = [next(s) for _ in range(4)]
    assert s.position == {"epoch": 0, "batch": 4, "skipped": {}}
    first = torch.cat([x for x, _ in eval_batches(shard_dir, 500, split="train", limit=200)])
    got = torch.cat([x for x, _ in batches])
    assert torch.equal(got.flatten(1).sum(1).sort().values, first.flatten(1).sum(1).sort().values)


def test_augment_is_a_function_of_the_generator():
    x = torch.randint(0, 255, (8, 1, 28, 28), dtype=torch.uint8)
    a = augment(x, torch.Generator().manual_seed(1), padding=2, hflip=True)
    b = augment(x, torch.Generator().manual_seed(1), padding=2, hflip=True)
    c = augment(x, torch.Generator().manual_seed(2), padding=2, hflip=True)
    assert a.shape == x.shape and a.dtype == torch.uint8
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(augment(x, torch.Generator(), padding=0, hflip=False), x)


def test_crop_shifts_content_within_the_padding():
    x = torch.zeros(1, 1, 28, 28, dtype=torch.uint8)
    x[0, 0, 10, 10] = 255
    for seed in range(10):
        out = augment(x, torch.Generator().manual_seed(seed), padding=2, hflip=False)
        (r, c) = (out[0, 0] == 255).nonzero()[0].tolist()
        assert abs(r - 10) <= 2 and abs(c - 10) <= 2


def test_missing_data_names_the_package(tmp_path):
    with pytest.raises(DataSourceError, match="dataset-fashion-mnist"):
        load_split(tmp_path, "train")
    with pytest.raises(DataSourceError, match="gwtn shards fashion-mnist"):
        read_index(tmp_path)


def test_corrupt_idx_is_a_clear_error(tmp_path):
    bad = tmp_path / "train-images-idx3-ubyte.gz"
    with gzip.open(bad, "wb") as f:
        f.write(b"\x00\x00\x08\x03" + (5).to_bytes(4, "big") * 3 + b"\x00" * 10)
    with pytest.raises(DataSourceError, match="header says"):
        read_idx(bad)


def test_missing_shard_file_is_reported(shard_dir, tmp_path):
    copy = tmp_path / "copy"
    copy.mkdir()
    (copy / "index.json").write_text((shard_dir / "index.json").read_text())
    with pytest.raises(DataSourceError, match="missing"):
        shard_urls(copy, "train")


def test_a_shard_folder_being_written_is_refused_and_a_killed_rewrite_lists_nothing(
        tmp_path, idx_dir):
    import socket
    import subprocess

    from gwtn_dist.data.fashion_mnist import write_fashion_mnist

    out = tmp_path / "shards"
    write_fashion_mnist(out, idx_dir, progress=False)
    holder = subprocess.Popen(["sleep", "60"])
    try:
        (out / ".lock").write_text(json.dumps({"host": socket.gethostname(), "pid": holder.pid}))
        with pytest.raises(DataSourceError, match=f"being written by process {holder.pid}"):
            write_fashion_mnist(out, idx_dir, progress=False)
    finally:
        holder.kill()
        holder.wait()
    assert read_index(out)["splits"]["train"]["samples"] == 1200  # left alone
    # A rewrite killed mid-way: the old index is gone first, so no reader trusts torn tars.
    from gwtn_dist.data import shards

    class Killed(Exception):
        pass

    def dies(*args, **kwargs):
        raise Killed

    original = shards.ShardSink.close
    shards.ShardSink.close = dies
    try:
        with pytest.raises(Killed):
            write_fashion_mnist(out, idx_dir, progress=False)
    finally:
        shards.ShardSink.close = original
    assert not (out / "index.json").exists() and not (out / ".lock").exists()
    with pytest.raises(DataSourceError, match="write the shards first"):
        train_stream(out, batch_size=10, seed=0)


def _with_undecodable_samples(shard_dir, out, count: int):
    """A copy of ``shard_dir`` whose first training tar has ``count`` .npy members garbled."""
    import io
    import shutil
    import tarfile

    shutil.copytree(shard_dir, out)
    first = out / read_index(out)["splits"]["train"]["shards"][0]
    members = []
    with tarfile.open(first) as tf:
        for m in tf:
            members.append((m, tf.extractfile(m).read()))
    garbled = 0
    with tarfile.open(first, "w") as tf:
        for m, data in members:
            if m.name.endswith(".npy") and garbled < count:
                data, garbled = b"not an array", garbled + 1
            m.size = len(data)
            tf.addfile(m, io.BytesIO(data))
    return out


def test_the_training_reader_counts_undecodable_samples_once_across_a_resume(shard_dir, tmp_path):
    bad = _with_undecodable_samples(shard_dir, tmp_path / "bad", count=3)
    stream = train_stream(bad, batch_size=100, seed=0, shuffle_buffer=500)
    for _ in range(11):  # 1197 good samples → 11 full batches: one whole epoch
        next(stream)
    assert stream.skipped == {"undecodable sample": 3}
    assert stream.position["skipped"] == {"undecodable sample": 3}
    resumed = train_stream(bad, batch_size=100, seed=0, shuffle_buffer=500)
    resumed.seek({"epoch": 0, "batch": 6, "skipped": {"undecodable sample": 2}})
    next(resumed)  # the replay of batches 0…5 counts nothing again
    assert resumed.skipped["undecodable sample"] <= 3


def _global_batches(shard_dir):
    from gwtn_dist.config import Config, FashionMnistDataConfig
    from gwtn_dist.data.batches import GlobalBatches

    cfg = Config(data=FashionMnistDataConfig(shards=str(shard_dir), batch_size=64,
                                             shuffle_buffer=300, val_samples=0))
    return GlobalBatches(cfg, stream_seed=7)


@pytest.mark.parametrize("depth", [0, 3])
def test_prefetched_batches_and_checkpointed_position_match_the_training_thread(shard_dir,
                                                                                 depth):
    from gwtn_dist.data.prefetch import Prefetcher

    keys = [(0, s) for s in range(10)] + [(1, s) for s in range(15)]  # two phases
    plain = _global_batches(shard_dir)
    expected = [plain.next(*k) for k in keys]
    feed = Prefetcher(_global_batches(shard_dir), iter(keys), depth=depth)
    try:
        for k, (x, y) in zip(keys[:12], expected[:12], strict=True):
            got_x, got_y = feed.next(*k)
            assert torch.equal(got_x, x) and torch.equal(got_y, y)
        # The thread has read ahead, but the position is that after the 12th batch taken:
        # a resume from it continues with the 13th, augmented as on time.
        position = feed.position
        assert position["batch"] == 12 % 18 and position["epoch"] == 0
        with pytest.raises(RuntimeError, match="phase 1 step 2"):
            feed.next(1, 5)  # asked out of order: an error, never a wrong batch
    finally:
        feed.close()
    resumed = _global_batches(shard_dir)
    resumed.seek(position)
    rest = Prefetcher(resumed, iter(keys[12:]), depth=depth)
    try:
        for k, (x, y) in zip(keys[12:], expected[12:], strict=True):
            got_x, got_y = rest.next(*k)
            assert torch.equal(got_x, x) and torch.equal(got_y, y)
    finally:
        rest.close()


def test_the_prefetch_thread_computes_on_one_core_and_leaves_the_training_threads_alone(
        shard_dir):
    # Its own OpenMP team would put more compute threads than cores on a small machine.
    import threading

    from gwtn_dist.data.prefetch import Prefetcher

    seen = {}

    def host(batch):
        seen[threading.current_thread().name] = torch.get_num_threads()
        return batch

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        feed = Prefetcher(_global_batches(shard_dir), iter([(0, 0), (0, 1)]), host=host, depth=2)
        try:
            feed.next(0, 0)
            feed.next(0, 1)
        finally:
            feed.close()
        assert seen == {"gwtn-prefetch": 1}
        assert torch.get_num_threads() == 2
        fresh = {}
        probe = threading.Thread(target=lambda: fresh.update(n=torch.get_num_threads()))
        probe.start()
        probe.join()
        assert fresh["n"] == 2  # the default of threads started later is put back
    finally:
        torch.set_num_threads(before)


def test_a_failure_in_the_prefetch_thread_reaches_the_training_thread(shard_dir):
    from gwtn_dist.data.prefetch import Prefetcher

    def broken(batch):
        raise DataSourceError("shard gone")

    feed = Prefetcher(_global_batches(shard_dir), iter([(0, 0), (0, 1)]), host=broken, depth=2)
    try:
        with pytest.raises(DataSourceError, match="shard gone"):
            feed.next(0, 0)
    finally:
        feed.close()


class _ConstantBatches:
    """A batch source that costs nothing: what the host function spends is all there is."""

    position, skipped = {"epoch": 0, "batch": 0}, {}

    def next(self, phase_index: int, step: int):
        return torch.zeros(2), torch.zeros(2)


@pytest.mark.parametrize("depth", [0, 2])
def test_the_prefetcher_reports_the_cpu_time_spent_making_each_batch_not_its_wall_time(depth):
    # A loaded machine stretches wall time; the data thread's CPU per batch is what it takes
    # from the step's cores, and it must not count time spent waiting.
    import time

    from gwtn_dist.data.prefetch import Prefetcher

    def busy(batch):  # 30 ms of CPU
        start = time.thread_time()
        while time.thread_time() - start < 0.03:
            pass
        return batch

    def idle(batch):  # 30 ms of waiting
        time.sleep(0.03)
        return batch

    for host, low, high in ((busy, 0.03, 1.0), (idle, 0.0, 0.02)):
        feed = Prefetcher(_ConstantBatches(), iter([(0, 0), (0, 1)]), host=host, depth=depth)
        try:
            for step in range(2):
                feed.next(0, step)
                assert low <= feed.cpu_s < high, (host.__name__, feed.cpu_s)
        finally:
            feed.close()
