"""Two hosts for real: torchrun across two network namespaces (``net_hosts.py``), each host
with its own address and name, the c10d rendezvous on host 1's, as ``gwtn launch --style
srun-torchrun`` starts it on a cluster (the per-node commands of ``launch.build``), without
SLURM.

- 2 hosts × 2 ranks imitate with the ZeRO-3 sharded teacher (DeepSpeed on CPU over gloo) and end
  with the weights of the same config on 4 ranks of one host, bit for bit; each rank holds 1/4 of
  the teacher (tiny BERT straight through; the tiny ResNet through the lost host below).
- Host 2 lost mid-imitation (its link down, then every process on it killed): host 1's ranks
  stop within dist.timeout_s + the roll call, with one line naming the lost ranks and host and
  exit 69; what was written stays intact, and a restart on both hosts with resume=true ends with
  the weights of the uninterrupted run on 4 ranks of one host.
- Host 2 trains on shards streamed over HTTP from a server on host 1.
- The rendezvous host lost before the start: host 2 stops within dist.rendezvous_timeout_s with
  one line naming the rendezvous.
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from net_hosts import hosts_fixture  # noqa: F401  (the `hosts` fixture)

from gwtn_dist import checkpoint, launch
from gwtn_dist.cli import main

pytestmark = pytest.mark.multihost

REPO = Path(__file__).resolve().parents[1]
# dist.timeout_s of these runs: how long host 1 waits for a silent host 2. Long enough for a
# rank that a loaded 2-core machine starts late (4 ranks, importing DeepSpeed) to join.
TIMEOUT_S = 30
RDZV_TIMEOUT_S = 120  # torchrun's wait for the other host (each agent starts in seconds)
# One config per family; every run of a family shares it (resume=true compares configs), and
# the single-process wide stage that they all imitate is trained once.
COMMON = ["progress=false", "threads=1", "eval_every=0", "dist.teacher=shard",
          f"dist.timeout_s={TIMEOUT_S}",
          "checkpoint.every=2"]
RESNET = [str(REPO / "configs" / "tiny_cpu.yaml"), "data.train_samples=0",
          "model.blocks=[1,1,1]", "model.inner_widths=[4,4,8]", "model.stem_width=8",
          "wide.steps=6", "imitate.steps_per_point=6"]
BERT = [str(REPO / "configs" / "bert_tiny_cpu.yaml"), "wide.steps=6",
        "imitate.steps_per_point=3"]


def env() -> dict:
    return {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1",
            "PYTHONWARNINGS": "ignore"}


def per_node(network, gwtn_args: list[str],
             rendezvous_timeout_s: int = RDZV_TIMEOUT_S) -> dict[str, list[str]]:
    """What ``gwtn launch --style srun-torchrun`` has each node run: one torchrun agent per host,
    2 ranks each, the rendezvous on the first host."""
    alloc = launch.Allocation(nodes=[h.name for h in network.hosts], ranks_per_node=2,
                              job_id="multihost")
    plan = launch.build("srun-torchrun", ["-q", *gwtn_args], alloc, port=29400,
                        rendezvous_timeout_s=rendezvous_timeout_s)
    return {node: shlex.split(text) for node, text in plan.per_node.items()}


def start(network, gwtn_args: list[str]) -> list[subprocess.Popen]:
    commands = per_node(network, gwtn_args)
    return [host.popen(commands[host.name], env=env(), stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT, text=True) for host in network.hosts]


def on_hosts(network, gwtn_args: list[str]) -> float:
    started = time.time()
    procs = start(network, gwtn_args)
    outputs = [p.communicate(timeout=900)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(o[-3000:] for o in outputs)
    return time.time() - started


def on_one_host(nproc: int, gwtn_args: list[str]) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc-per-node={nproc}", "-m", "gwtn_dist", "-q", *gwtn_args]
    proc = subprocess.Popen(cmd, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        out = proc.communicate(timeout=900)[0]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)  # torchrun and its ranks
    assert proc.returncode == 0, out[-3000:]


def weights(run_dir: Path, stage: str = "imitate") -> dict[str, torch.Tensor]:
    return checkpoint.load(run_dir / stage / "model.pt")["state_dict"]


def assert_same_weights(a: Path, b: Path, stage: str = "imitate") -> None:
    wa, wb = weights(a, stage), weights(b, stage)
    assert wa.keys() == wb.keys()
    for name, tensor in wa.items():
        assert torch.equal(tensor, wb[name]), name


@pytest.fixture(scope="module")
def family_runs(tmp_path_factory, hosts, shard_dir, request):
    """Per family: the wide stage trained once on one process, and imitation on 4 ranks of one
    host, each imitation in its own run folder holding a copy of that wide stage."""
    made: dict[str, dict] = {}

    def get(family: str) -> dict:
        if family in made:
            return made[family]
        root = tmp_path_factory.mktemp(family)
        if family == "resnet":
            base = [*RESNET, f"data.shards={shard_dir}"]
        else:
            base = [*BERT, f"data.shards={request.getfixturevalue('text_shards')}"]
        args = {name: [*base, *COMMON, f"run_dir={root / name}"]
                for name in ("wide", "one_host", "two_hosts", "lost")}
        assert main(["-q", "wide", *args["wide"]]) == 0
        for name in ("one_host", "two_hosts", "lost"):
            shutil.copytree(root / "wide" / "wide", root / name / "wide")
        on_one_host(4, ["imitate", *args["one_host"]])
        made[family] = {"args": args, "root": root}
        return made[family]

    return get


def assert_a_quarter_of_the_teacher(run_dir: Path) -> dict:
    record = json.loads((run_dir / "imitate" / "stage.json").read_text())
    teacher = record["teacher"]
    assert record["world_size"] == 4 and teacher["mode"] == "shard"
    # ZeRO-3 pads each parameter to a multiple of the world size: 1/4 plus at most 3 elements
    # (4 bytes each) per tensor.
    total, per_rank = teacher["param_bytes_total"], teacher["param_bytes_per_rank"]
    tensors = len(weights(run_dir, "wide"))
    assert total / 4 <= per_rank <= total / 4 + 12 * tensors, teacher
    return teacher


@pytest.fixture(scope="module")
def text_shards(tmp_path_factory) -> Path:
    from test_bert_pipeline import write_shards

    return write_shards(tmp_path_factory.mktemp("bert-text"), test_every=10)


def test_two_hosts_train_what_four_ranks_of_one_host_do(family_runs, hosts):
    """Tiny BERT; the tiny ResNet's run across hosts is the lost-host test's, which must end
    where the one-host run does too."""
    runs = family_runs("bert")
    root = runs["root"]
    wall = on_hosts(hosts, ["imitate", *runs["args"]["two_hosts"]])
    assert_same_weights(root / "one_host", root / "two_hosts")
    teacher = assert_a_quarter_of_the_teacher(root / "two_hosts")
    print(f"bert: 2 hosts x 2 ranks imitate in {wall:.1f} s, teacher "
          f"{teacher['param_bytes_per_rank']} of {teacher['param_bytes_total']} bytes per rank")


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_lost_host_stops_the_other_within_the_timeout_and_the_job_resumes(family_runs,
                                                                             hosts):
    runs = family_runs("resnet")
    run_dir = runs["root"] / "lost"
    args = ["imitate", *runs["args"]["lost"]]
    wide_before = _digest(run_dir / "wide" / "model.pt")
    procs = start(hosts, args)
    ckpt = run_dir / "imitate" / "checkpoint.pt"
    deadline = time.time() + 600
    while not ckpt.exists():
        assert all(p.poll() is None for p in procs), procs[0].communicate()[0][-3000:]
        assert time.time() < deadline, "no imitation checkpoint within 600 s"
        time.sleep(0.05)
    lost_at = hosts[1].lose()
    out, _ = procs[0].communicate(timeout=TIMEOUT_S + 300)
    stopped = time.time() - lost_at
    procs[1].communicate(timeout=30)
    hosts[1].link(True)
    errors = [line for line in out.splitlines() if line.startswith("gwtn: error:")]
    assert procs[0].returncode == 69, out[-3000:]
    # One line, from the lowest surviving rank, naming the lost ranks and their host.
    assert len(errors) == 1, out[-3000:]
    assert "lost ranks 2, 3 on gwtn-h2" in errors[0] and "resume=true" in errors[0], errors
    # Bounded, not a hang: dist.timeout_s, the 3 s roll call, and the processes' exit.
    assert stopped < TIMEOUT_S + 120, (stopped, out[-3000:])
    print(f"host 2 lost at {lost_at:.1f}; host 1 exited after {stopped:.1f} s "
          f"(dist.timeout_s={TIMEOUT_S}): {errors[0]}")
    # Nothing written is damaged: the wide stage untouched, the last checkpoint loads and its
    # DeepSpeed tag is complete, every metrics line is whole.
    assert _digest(run_dir / "wide" / "model.pt") == wide_before
    saved = checkpoint.load(ckpt)
    assert saved["engine"]["deepspeed_tag"] in os.listdir(run_dir / "imitate" / "deepspeed")
    lines = (run_dir / "imitate" / "metrics.jsonl").read_text().splitlines()
    assert all(json.loads(line) for line in lines)
    assert not (run_dir / "imitate" / "DONE").exists()

    wall = on_hosts(hosts, [*args, "resume=true"])
    record = json.loads((run_dir / "imitate" / "stage.json").read_text())
    assert record["resumes"] and record["resumes"][0]["world_size"] == 4
    # The uninterrupted run is the one on 4 ranks of one host: the same weights show both that
    # 2 hosts x 2 ranks compute what one host does and that the resume is exact.
    assert_same_weights(runs["root"] / "one_host", run_dir)
    teacher = assert_a_quarter_of_the_teacher(run_dir)
    print(f"resnet: resumed on both hosts in {wall:.1f} s from {record['resumes'][0]}; "
          f"weights equal the uninterrupted one-host run's; teacher "
          f"{teacher['param_bytes_per_rank']} of {teacher['param_bytes_total']} bytes per rank")


def test_the_rendezvous_host_lost_before_the_start_is_one_line(hosts, tmp_path, shard_dir):
    hosts[0].link(False)
    try:
        command = per_node(hosts, ["wide", *RESNET, *COMMON, f"data.shards={shard_dir}",
                                   f"run_dir={tmp_path / 'run'}"], rendezvous_timeout_s=10)
        command = command[hosts[1].name]
        started = time.time()
        proc = hosts[1].run(command, env=env(), capture_output=True, text=True, timeout=120)
        took = time.time() - started
    finally:
        hosts[0].link(True)
    lines = [line for line in proc.stderr.splitlines() if line.startswith("gwtn: error:")]
    assert proc.returncode == 69, proc.stderr[-3000:]
    assert len(lines) == 1 and "rendezvous at gwtn-h1:29400" in lines[0], proc.stderr[-3000:]
    assert took < 10 + 30, took
    assert not (tmp_path / "run").exists()  # no rank ever started


def test_host_2_trains_on_shards_served_by_host_1(family_runs, hosts, shard_dir):
    """The wide stage on host 2, its shards streamed over HTTP from a server on host 1, ends
    with the weights of the same stage read from the local folder."""
    runs = family_runs("resnet")
    server = hosts[0].popen([sys.executable, str(REPO / "tests" / "http_shards.py"),
                             str(shard_dir), hosts[0].addr, "8765"], stdout=subprocess.PIPE,
                            text=True)
    try:
        assert server.stdout.readline().startswith("serving"), "the server did not start"
        run_dir = runs["root"] / "over_http"
        args = [*runs["args"]["wide"][:-1], f"run_dir={run_dir}",
                f"data.shards=http://{hosts[0].name}:8765"]
        proc = hosts[1].run([sys.executable, "-m", "gwtn_dist", "-q", "wide", *args],
                            env=env(), capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
    finally:
        server.kill()
        server.wait()
    assert_same_weights(runs["root"] / "wide", run_dir, "wide")


def test_a_rank_without_its_rendezvous_host_stops_within_the_timeout(tmp_path, shard_dir):
    """A rank started without an agent (as plain srun starts them) whose rendezvous host (rank
    0's store) never answers: one line naming the address, exit 69, after dist.timeout_s."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens there once closed
    ranks = {"RANK": "1", "LOCAL_RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
             "MASTER_PORT": str(port)}
    started = time.time()
    proc = subprocess.run([sys.executable, "-m", "gwtn_dist", "-q", "wide", *RESNET, *COMMON,
                           f"data.shards={shard_dir}", f"run_dir={tmp_path / 'run'}",
                           "dist.timeout_s=5"], env={**env(), **ranks}, capture_output=True,
                          text=True, timeout=180, check=False)
    took = time.time() - started
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 69, proc.stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith("gwtn: error: rank 1 could not join"), lines
    assert f"127.0.0.1:{port} within dist.timeout_s=5 s" in lines[0]
    assert took < 5 + 60, took
