"""``gwtn launch`` without SLURM: the commands each style gives each node, the dry run, and a
stop on request on this machine (the signal to the launcher → checkpoint → exit 75 → resume)."""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from gwtn_dist import checkpoint
from gwtn_dist.distributed import preempt
from gwtn_dist.distributed.env import LaunchError
from gwtn_dist.distributed.runtime import Runtime
from gwtn_dist.launch import Allocation, allocation, build, hostfile_text

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "configs" / "tiny_cpu.yaml")
JOB = {"SLURM_JOB_ID": "42", "SLURM_JOB_NODELIST": "gpu[01-02]", "SLURM_TASKS_PER_NODE": "4(x2)",
       "SLURM_JOB_CPUS_PER_NODE": "32(x2)"}


def test_allocation_reads_the_slurm_job():
    alloc = allocation(JOB)
    assert alloc == Allocation(nodes=["gpu01", "gpu02"], ranks_per_node=4, job_id="42",
                               restarts=0, cpus_per_node=32)
    assert alloc.world_size == 8
    assert allocation({}, nodes="n[1-3]", ranks_per_node=2).nodes == ["n1", "n2", "n3"]
    assert allocation({}) == Allocation(nodes=["localhost"], ranks_per_node=1)
    with pytest.raises(LaunchError, match="same count on every node"):
        allocation({**JOB, "SLURM_TASKS_PER_NODE": "4,3"})


def test_srun_torchrun_starts_one_torchrun_per_node_with_c10d_on_the_first_node():
    plan = build("srun-torchrun", ["wide", "c.yaml"], allocation(JOB), port=20042)
    assert plan.command[:6] == ["srun", "--nodes=2", "--ntasks=2", "--ntasks-per-node=1",
                                "--kill-on-bad-exit=1", "--cpus-per-task=32"]
    node = plan.per_node["gpu02"]
    for part in ("-m gwtn_dist.distributed.agent ", "--nnodes=2", "--nproc-per-node=4",
                 "--rdzv-backend=c10d", "--rdzv-endpoint=gpu01:20042", "--rdzv-id=42",
                 "--rdzv-conf=join_timeout=300,read_timeout=300", "-m gwtn_dist wide c.yaml"):
        assert part in node
    assert plan.per_node["gpu01"] == node  # c10d hands out node ranks: one command for all


@pytest.mark.parametrize(("script", "code", "line"), [
    ("import sys; sys.exit(75)", 75, None),  # a rank's own code, not torchrun's 1
    ("import os, signal; os.kill(os.getpid(), signal.SIGKILL)", 128 + 9,
     "gwtn: error: rank 0 on "),
])
def test_the_node_agent_ends_with_its_ranks_exit_code(tmp_path, script, code, line):
    (tmp_path / "rank.py").write_text(script)
    proc = subprocess.run([sys.executable, "-m", "gwtn_dist.distributed.agent", "--standalone",
                           "--nproc-per-node=1", str(tmp_path / "rank.py")],
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == code, proc.stderr[-2000:]
    errors = [x for x in proc.stderr.splitlines() if x.startswith("gwtn: error")]
    assert len(errors) == (0 if line is None else 1), proc.stderr[-2000:]
    if line:
        assert errors[0].startswith(line) and errors[0].endswith("was killed by SIGKILL")
        assert "ChildFailedError" not in proc.stderr  # torchrun's report left out


def test_srun_starts_one_task_per_rank_with_the_rendezvous_in_the_environment():
    plan = build("srun", ["run", "c.yaml"], allocation(JOB), port=20042)
    assert plan.command[:5] == ["srun", "--nodes=2", "--ntasks=8", "--ntasks-per-node=4",
                                "--kill-on-bad-exit=1"]
    assert plan.command[-4:] == ["-m", "gwtn_dist", "run", "c.yaml"]
    assert plan.env == {"MASTER_ADDR": "gpu01", "MASTER_PORT": "20042"}
    assert "SLURM_PROCID 4..7" in plan.per_node["gpu02"]


def test_deepspeed_slurm_passes_deepspeed_a_module_it_can_parse(tmp_path):
    from deepspeed.launcher.runner import parse_args  # a hard dependency: never skipped

    plan = build("deepspeed-slurm", ["wide", "c.yaml", "x=1"], allocation(JOB), port=20042,
                 hostfile=tmp_path / "hf")
    assert plan.command[1:3] == ["-m", "deepspeed.launcher.runner"]
    args = parse_args(plan.command[3:])
    assert args.launcher == "slurm" and args.hostfile == str(tmp_path / "hf")
    assert (args.user_script, args.user_args) == ("-m", ["gwtn_dist", "wide", "c.yaml", "x=1"])
    assert (args.master_addr, args.master_port) == ("gpu01", 20042)
    assert plan.hostfile == hostfile_text(allocation(JOB)) == "gpu01 slots=4\ngpu02 slots=4\n"


def test_deepspeed_nossh_gives_each_node_its_own_rank():
    """srun runs one shell line everywhere; on node K it must expand to node K's command."""
    plan = build("deepspeed-nossh", ["wide", "c.yaml", "run_dir=a b"], allocation(JOB),
                 port=20042, hostfile=Path("hf"))
    assert plan.command[-3:-1] == ["bash", "-c"]
    line = plan.command[-1]
    assert line.startswith("exec ")
    for k, node in enumerate(["gpu01", "gpu02"]):
        shown = subprocess.run(["bash", "-c", "printf '%s\\n' " + line[len("exec "):]],
                               env={**os.environ, "SLURM_NODEID": str(k)}, capture_output=True,
                               text=True, check=True).stdout.splitlines()
        assert shown == shlex.split(plan.per_node[node])
        assert f"--node_rank={k}" in shown and "run_dir=a b" in shown


def test_deepspeed_hostfile_and_local():
    plan = build("deepspeed-hostfile", ["wide", "c.yaml"], allocation(JOB), port=1,
                 hostfile=Path("hf"))
    assert "--module" in plan.command and "--no_ssh" not in plan.command
    with pytest.raises(LaunchError, match="needs a hostfile"):
        build("deepspeed-slurm", ["wide", "c.yaml"], allocation(JOB), port=1)
    with pytest.raises(LaunchError, match="this machine only"):
        build("local", ["wide", "c.yaml"], allocation(JOB), port=1)
    one = build("local", ["wide", "c.yaml"], allocation({}), port=1)
    assert one.command[1:] == ["-m", "gwtn_dist", "wide", "c.yaml"]
    two = build("local", ["wide", "c.yaml"], allocation({}, ranks_per_node=2), port=1)
    assert "--standalone" in two.command and "--nproc-per-node=2" in two.command


def gwtn(*args: str, env: dict | None = None, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gwtn_dist", *args], capture_output=True,
                          text=True, env={**os.environ, **(env or {})}, check=False, **kw)


def test_dry_run_prints_every_node_command_and_writes_nothing(tmp_path):
    run_dir = tmp_path / "run"
    env = {**JOB, "SLURM_RESTART_COUNT": "1"}
    proc = gwtn("launch", "--style", "deepspeed-nossh", "--dry-run", "--", "run", TINY,
                f"run_dir={run_dir}", env=env)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "# style deepspeed-nossh: 2 node(s) x 4 rank(s) = 8 ranks" in out
    assert "#   gpu02 slots=4" in out
    assert "# node gpu01 runs:" in out and "--node_rank=1" in out
    assert f"run_dir={run_dir} resume=true" in out  # a requeued job resumes its run
    assert not run_dir.exists()
    bad = gwtn("launch", "--dry-run", "--", "run", TINY, "nope=1")
    assert bad.returncode == 2 and "nope" in bad.stderr


def test_a_date_in_run_dir_is_filled_once_for_every_rank(tmp_path):
    template = str(tmp_path / "run-{date}")
    proc = gwtn("launch", "--style", "local", "--nproc-per-node", "2", "--dry-run", "--", "run",
                TINY, f"run_dir={template}")
    assert proc.returncode == 0, proc.stderr
    (filled,) = set(re.findall(r"run_dir=(\S*run-\d{8}-\d{6})", proc.stdout))
    assert filled.startswith(str(tmp_path))
    # Under SLURM with requeue, a requeued start could not find the run: refused up front.
    proc = gwtn("launch", "--dry-run", "--", "run", TINY, f"run_dir={template}", env=JOB)
    assert proc.returncode == 2 and "requeued job would start a new folder" in proc.stderr


def test_stop_requests_by_file_or_signal_are_consumed(tmp_path):
    preempt.install(tmp_path, Runtime())
    try:
        assert not preempt.stop_requested()
        preempt.stop_file(tmp_path).touch()
        assert preempt.stop_requested()
        assert not preempt.stop_file(tmp_path).exists()
        assert not preempt.stop_requested()
        os.kill(os.getpid(), signal.SIGUSR1)
        assert preempt.stop_requested()
        assert not preempt.stop_requested()
    finally:
        preempt.restore()
    assert preempt.signal_number("usr2") == preempt.signal_number("SIGUSR2") == signal.SIGUSR2


def test_a_stop_file_older_than_the_run_is_ignored(tmp_path):
    stale = preempt.stop_file(tmp_path)
    stale.touch()
    old = time.time() - 3600
    os.utime(stale, (old, old))
    preempt.install(tmp_path, Runtime())
    try:
        assert not preempt.asked_here()  # left by an earlier run: ignored
        stale.touch()  # written now: a real request
        assert preempt.asked_here()
    finally:
        preempt.restore()


def test_a_stopped_stage_resumes_to_the_uninterrupted_weights(tmp_path, shard_dir):
    """USR1 to ``gwtn launch --style local``: the run stops at a step, checkpoints, exits 75;
    the same command continues to the weights of a run that was never stopped. (One rank keeps
    this quick; tests/test_slurm.py stops 2 ranks under SLURM.)"""

    def args(run_dir: Path) -> list[str]:
        return ["launch", "--style", "local", "--", "wide", TINY,
                f"run_dir={run_dir}", f"data.shards={shard_dir}", "progress=false", "threads=1",
                "eval_every=0", "wide.steps=40", "checkpoint.every=5", "data.train_samples=0"]

    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1",
           "PYTHONWARNINGS": "ignore"}
    stopped = tmp_path / "stopped"
    job = subprocess.Popen([sys.executable, "-m", "gwtn_dist", *args(stopped)], env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 240
    while not (stopped / "wide" / "checkpoint.pt").exists():
        assert job.poll() is None and time.time() < deadline, job.communicate()[0][-3000:]
        time.sleep(0.1)
    job.send_signal(signal.SIGUSR1)
    out = job.communicate(timeout=240)[0]
    assert job.returncode == preempt.EXIT_CODE, out[-3000:]
    steps = [json.loads(line)["step"] for line in
             (stopped / "wide" / "metrics.jsonl").read_text().splitlines()]
    assert 5 <= len(steps) < 40 and steps == list(range(1, len(steps) + 1))
    assert checkpoint.load(stopped / "wide" / "checkpoint.pt")["step"] == len(steps)

    logs = {}
    for run_dir in (stopped, tmp_path / "straight"):
        proc = subprocess.run([sys.executable, "-m", "gwtn_dist", *args(run_dir)], env=env,
                              capture_output=True, text=True, timeout=300, check=False)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
        logs[run_dir] = proc.stdout + proc.stderr
    assert f"resuming wide at phase 0 (wide), step {len(steps)}" in logs[stopped]
    steps = [json.loads(line)["step"] for line in
             (stopped / "wide" / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 41))
    resumed = checkpoint.load(stopped / "wide" / "model.pt")["state_dict"]
    straight = checkpoint.load(tmp_path / "straight" / "wide" / "model.pt")["state_dict"]
    for name, tensor in straight.items():
        assert torch.equal(resumed[name], tensor), name


def test_a_slurm_style_outside_slurm_says_what_to_use(tmp_path):
    proc = gwtn("launch", "--style", "srun", "--", "wide", TINY, f"run_dir={tmp_path / 'run'}",
                env={"PATH": str(Path(sys.executable).parent)})
    assert proc.returncode == 2
    assert "srun not found" in proc.stderr and "--style local" in proc.stderr
