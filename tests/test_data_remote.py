"""Shards over the network (``gwtn_dist/data/remote.py``): a shard folder served over HTTP by a
server the test starts on loopback (``http_shards.py``), and ``pipe:`` commands, read with
everything the local reader promises. The same from a second host: ``test_multihost.py``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from http_shards import ShardServer

from gwtn_dist import checkpoint
from gwtn_dist.cli import main
from gwtn_dist.data import remote
from gwtn_dist.data.streams import read_index, text_stream

REPO = Path(__file__).resolve().parents[1]
FAST = ["progress=false", "threads=1", "data.train_samples=0", "model.blocks=[1,1,1]",
        "model.inner_widths=[4,4,8]", "model.stem_width=8", "wide.steps=6", "eval_every=3",
        "eval_samples=100", "checkpoint.every=3"]


@pytest.fixture
def served(request):
    """Start a server of a folder; stopped after the test."""
    servers = []

    def serve(folder: Path) -> ShardServer:
        servers.append(ShardServer(folder).start())
        return servers[-1]

    yield serve
    for server in servers:
        server.stop()


@pytest.fixture(scope="module")
def text_shards(tmp_path_factory) -> Path:
    from test_bert_pipeline import write_shards

    return write_shards(tmp_path_factory.mktemp("bert-text"), test_every=10)


@pytest.fixture(autouse=True)
def _quick_retries(monkeypatch):
    monkeypatch.setattr(remote, "BACKOFF_S", 0.01)  # the policy's waits, not its count


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def stream(source, **kw):
    return text_stream(source, batch_size=8, seed=3, shuffle_buffer=50, **kw)


def test_a_url_folder_gives_the_local_batches_resumes_exactly_and_evaluates_once(
        text_shards, served):
    server = served(text_shards)
    local = stream(text_shards, train=True, rank=1, world_size=2, num_workers=2)
    over = stream(server.url, train=True, rank=1, world_size=2, num_workers=2)
    for _ in range(5):
        assert same(next(local), next(over))
    position = over.position
    ahead = [next(over) for _ in range(3)]
    resumed = stream(server.url, train=True, rank=1, world_size=2, num_workers=2)
    resumed.seek(position)
    assert all(same(a, next(resumed)) for a in ahead)  # the exact next batches
    # Eval: every val sequence once over both ranks, the local reader's batches.
    seen = 0
    for rank in (0, 1):
        kw = {"train": False, "rank": rank, "world_size": 2, "num_workers": 2}
        pairs = list(zip(stream(text_shards, **kw), stream(server.url, **kw), strict=True))
        assert all(same(a, b) for a, b in pairs)
        seen += sum(len(b["input_ids"]) for b, _ in pairs)
    assert seen == read_index(text_shards)["splits"]["val"]["samples"]


def test_a_connection_dropped_mid_tar_is_read_again_and_counted(text_shards, served):
    server = served(text_shards)
    names = read_index(text_shards)["splits"]["train"]["shards"]
    for name in names:
        server.drop[name] = 1  # every train tar's first transfer stops halfway
    local = stream(text_shards, train=True)
    over = stream(server.url, train=True)
    for _ in range(local.batches_per_epoch):  # one whole epoch: every tar read to its end
        assert same(next(local), next(over))
    assert over.skipped == {remote.RETRIED: len(names)}  # counted, nothing lost
    assert over.position["skipped"] == {remote.RETRIED: len(names)}  # saved with a checkpoint
    assert all(server.requests[name] == 2 for name in names), server.requests


def test_a_pipe_folder_and_a_brace_pattern_of_urls_read_the_same_data(text_shards, served):
    server = served(text_shards)
    pipe = f"pipe:cat {text_shards}/{{name}}"
    kw = {"train": False, "split": "val"}
    expected = list(stream(text_shards, **kw))
    assert all(same(a, b) for a, b in zip(expected, stream(pipe, **kw), strict=True))
    names = read_index(text_shards)["splits"]["val"]["shards"]
    first, last = names[0].rsplit("-", 1)[1][:-4], names[-1].rsplit("-", 1)[1][:-4]
    prefix = names[0].rsplit("-", 1)[0]
    from gwtn_dist.data.streams import resolve_shards

    urls, counts = resolve_shards(f"{server.url}/{prefix}-{{{first}..{last}}}.tar", "val")
    assert counts == read_index(text_shards)["splits"]["val"]["shard_samples"]
    assert urls == [f"{server.url}/{name}" for name in names]


def run_wide(run_dir: Path, shards: str, *extra: str) -> int:
    return main(["-q", "wide", str(REPO / "configs" / "tiny_cpu.yaml"), f"run_dir={run_dir}",
                 f"data.shards={shards}", *FAST, *extra])


def test_fashion_mnist_over_http_trains_the_local_weights(tmp_path, shard_dir, served):
    """The global stream, its validation carve-out and the test split, over HTTP."""
    server = served(shard_dir)
    assert run_wide(tmp_path / "local", str(shard_dir)) == 0
    assert run_wide(tmp_path / "http", server.url) == 0
    a = checkpoint.load(tmp_path / "local" / "wide" / "model.pt")["state_dict"]
    b = checkpoint.load(tmp_path / "http" / "wide" / "model.pt")["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    rec = [json.loads((tmp_path / r / "wide" / "stage.json").read_text())
           for r in ("local", "http")]
    assert rec[0]["test_samples"] == rec[1]["test_samples"] == 300  # every test sample once
    assert rec[0]["val_accuracy"] == rec[1]["val_accuracy"]  # the same carved-out samples


def test_a_404_is_one_line_and_exit_2(tmp_path, shard_dir, served, capsys):
    server = served(shard_dir)
    assert run_wide(tmp_path / "run", f"{server.url}/no-such-folder") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("gwtn: error: "), err
    assert "no-such-folder/index.json" in err[0] and "HTTP error" in err[0]


def test_a_source_that_keeps_dropping_stops_with_one_line_and_exit_74(tmp_path, shard_dir,
                                                                      served, capsys):
    server = served(shard_dir)
    server.drop["train-00000.tar"] = remote.RETRIES + 1  # more breaks than the policy allows
    assert run_wide(tmp_path / "run", server.url) == 74
    err = [line for line in capsys.readouterr().err.splitlines()
           if line.startswith("gwtn: error")]
    assert len(err) == 1 and "train-00000.tar: could not be read whole" in err[0], err
    assert server.requests["train-00000.tar"] == remote.RETRIES + 1
    assert not (tmp_path / "run" / "wide" / "model.pt").exists()  # no short epoch trained on
