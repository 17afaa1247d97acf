"""The batch scripts on a real SLURM of two nodes, started by the tests: one slurmd in each of
two test hosts (network namespaces with their own address and host name, ``net_hosts.py``;
``slurm_cluster.py``), so every job runs ``sbatch --nodes=2`` with one rank per node and its
ranks talk across the hosts' addresses.

The tiny config runs with 2 tasks through ``launch/sbatch_stage.sh``, as a user submits it: once
straight through (launch style deepspeed-slurm); once with SLURM's warning signal sent to the
batch shell in the middle of the wide stage (srun-torchrun), after which the job must checkpoint,
requeue itself, resume and end with the same weights; once with node 2 lost in the middle of the
wide stage (its link down, every process on it killed, slurmd included), after which the job is
requeued, waits for the node to come back and resumes to the same weights; as three chained jobs
from ``launch/submit.sh``, which must end there too; and one stage with the srun and
deepspeed-nossh styles.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from net_hosts import hosts_fixture  # noqa: F401  (the `hosts` fixture)
from slurm_cluster import Unavailable, start_cluster

from gwtn_dist import checkpoint

pytestmark = pytest.mark.slurm

REPO = Path(__file__).resolve().parents[1]
SCRIPT = str(REPO / "launch" / "sbatch_stage.sh")
STAGES = ("wide", "imitate", "finetune")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, hosts):
    try:
        running = start_cluster(tmp_path_factory.mktemp("slurm"), hosts)
    except Unavailable as exc:
        pytest.skip(f"SLURM cannot start here: {exc}")
    # The jobs import this checkout and run DeepSpeed on the CPU, one thread per rank. The batch
    # script's `python3` must be this interpreter: the suite may run as .venv/bin/python -m pytest
    # without the venv on PATH, where python3 would be the system's (as a user's job finds their
    # venv when they submit from a shell that activated it: sbatch passes PATH on).
    path = os.pathsep.join([str(Path(sys.executable).parent), running.env.get("PATH", "")])
    running.env.update(PATH=path,
                       PYTHONPATH=os.pathsep.join(filter(None, [str(REPO),
                                                                os.environ.get("PYTHONPATH")])),
                       DS_ACCELERATOR="cpu", PYTHONWARNINGS="ignore")
    yield running
    running.stop()


def tiny(shard_dir: Path, run_dir: Path) -> list[str]:
    return [str(REPO / "configs" / "tiny_cpu.yaml"), f"run_dir={run_dir}",
            f"data.shards={shard_dir}", "progress=false", "threads=1", "eval_every=0",
            "data.train_samples=0", "arms=[win]", "wide.steps=40", "checkpoint.every=5",
            "imitate.steps_per_point=4", "finetune.kd_steps=2", "finetune.label_steps=6"]


def submit(cluster, folder: Path, style: str, *gwtn_args: str) -> tuple[str, Path]:
    log = folder / "job.out"
    job = cluster.sbatch("--nodes=2", "--ntasks-per-node=1", "--cpus-per-task=1",
                         "--time=00:10:00", f"--output={log}", f"--chdir={folder}", SCRIPT,
                         *gwtn_args, env={"GWTN_STYLE": style})
    return job, log


def assert_complete(run_dir: Path) -> None:
    summary = json.loads((run_dir / "summary.json").read_text())["stages"]
    for stage in STAGES:
        assert (run_dir / stage / "DONE").is_file(), stage
        assert (run_dir / stage / "model.pt").is_file(), stage
        assert summary[stage]["world_size"] == 2, stage
        # One metrics line per step of each phase, none twice (a resume drops the lines after
        # its checkpoint before it goes on).
        lines = [json.loads(line) for line in
                 (run_dir / stage / "metrics.jsonl").read_text().splitlines()]
        per_phase: dict[int, list[int]] = {}
        for rec in lines:
            per_phase.setdefault(rec["phase_index"], []).append(rec["step"])
        for index, phase in enumerate(summary[stage]["phases"]):
            assert per_phase[index] == list(range(1, phase["steps"] + 1)), (stage, phase)


@pytest.fixture(scope="module")
def straight_run(cluster, tmp_path_factory, shard_dir) -> Path:
    folder = tmp_path_factory.mktemp("straight")
    run_dir = folder / "run"
    job, log = submit(cluster, folder, "deepspeed-slurm", "run", *tiny(shard_dir, run_dir))
    info = cluster.wait(job)
    assert info["JobState"] == "COMPLETED", log.read_text()[-4000:]
    return run_dir


def test_sbatch_runs_the_tiny_config_on_two_tasks(straight_run):
    assert_complete(straight_run)
    assert (straight_run / "results.md").is_file()
    log = (straight_run.parent / "job.out").read_text()
    assert "launching (deepspeed-slurm)" in log
    assert "rank 1 of 2 (local 0, launcher srun)" in log  # one rank on each node
    assert "on gwtn-h[1-2]:" in log


def test_the_warning_signal_checkpoints_requeues_and_the_job_resumes(
        cluster, straight_run, tmp_path, shard_dir):
    run_dir = tmp_path / "run"
    job, log = submit(cluster, tmp_path, "srun-torchrun", "run", *tiny(shard_dir, run_dir))
    deadline = time.time() + 240
    while not (run_dir / "wide" / "checkpoint.pt").exists():
        assert cluster.job(job)["JobState"] in ("PENDING", "RUNNING"), log.read_text()[-4000:]
        assert time.time() < deadline, "no checkpoint within 240 s"
        time.sleep(0.1)
    # What `#SBATCH --signal=B:USR1@N` does before the time limit, now.
    cluster.run("scancel", "--signal=USR1", "--batch", job)
    info = cluster.wait(job)
    text = log.read_text()
    assert info["JobState"] == "COMPLETED", text[-4000:]
    assert info["Restarts"] == "1", info
    assert "got SIGUSR1: asking the ranks to checkpoint and stop" in text
    assert "requeueing job" in text
    assert "resuming wide at phase 0 (wide), step " in text
    stopped_at = int(text.split("resuming wide at phase 0 (wide), step ")[1].split()[0])
    assert 5 <= stopped_at < 40  # mid-stage, at or after the first checkpoint
    assert_complete(run_dir)
    for stage in STAGES:
        resumed = checkpoint.load(run_dir / stage / "model.pt")["state_dict"]
        reference = checkpoint.load(straight_run / stage / "model.pt")["state_dict"]
        for name, tensor in reference.items():
            assert torch.equal(resumed[name], tensor), (stage, name)


def test_submit_chains_the_stages_and_they_end_like_one_run(cluster, straight_run, tmp_path,
                                                           shard_dir):
    run_dir = tmp_path / "run"
    out = subprocess.run([*cluster.prefix, str(REPO / "launch" / "submit.sh"), "--nodes=2",
                          "--ntasks-per-node=1", "--cpus-per-task=1", f"--chdir={tmp_path}",
                          *tiny(shard_dir, run_dir)],
                         env=cluster.env, capture_output=True, text=True, check=True).stdout
    ids = dict(line.split(": job ") for line in out.splitlines())
    assert list(ids) == list(STAGES)
    # Each later stage waits for the one before it to succeed.
    assert cluster.job(ids["imitate"])["Dependency"].startswith(f"afterok:{ids['wide']}")
    assert cluster.job(ids["finetune"])["Dependency"].startswith(f"afterok:{ids['imitate']}")
    for stage in STAGES:
        info = cluster.wait(ids[stage])
        log = tmp_path / f"gwtn-{stage}-{ids[stage]}.out"
        assert info["JobState"] == "COMPLETED", log.read_text()[-4000:]
    assert_complete(run_dir)
    for stage in STAGES:  # three jobs hand off by path and end where one `run` job ends
        chained = checkpoint.load(run_dir / stage / "model.pt")["state_dict"]
        reference = checkpoint.load(straight_run / stage / "model.pt")["state_dict"]
        for name, tensor in reference.items():
            assert torch.equal(chained[name], tensor), (stage, name)


@pytest.mark.parametrize("style", ["srun", "deepspeed-nossh"])
def test_the_other_styles_start_two_ranks(cluster, tmp_path, shard_dir, style):
    run_dir = tmp_path / "run"
    job, log = submit(cluster, tmp_path, style, "wide", *tiny(shard_dir, run_dir), "wide.steps=4")
    info = cluster.wait(job)
    assert info["JobState"] == "COMPLETED", log.read_text()[-4000:]
    record = json.loads((run_dir / "wide" / "stage.json").read_text())
    assert (record["world_size"], record["steps"]) == (2, 4)
    assert f"launching ({style})" in log.read_text()


def test_a_lost_node_requeues_the_job_which_resumes(cluster, hosts, straight_run, tmp_path,
                                                    shard_dir):
    """Node 2 lost mid-stage: its link down, every process on it killed (slurmd too). Node 1's
    rank stops after dist.timeout_s, SLURM marks the node DOWN after SlurmdTimeout and requeues
    the job; once the node is back (its slurmd started again) the job resumes and ends with the
    uninterrupted run's weights."""
    run_dir = tmp_path / "run"
    job, log = submit(cluster, tmp_path, "srun-torchrun", "wide", *tiny(shard_dir, run_dir),
                      "dist.timeout_s=20")
    deadline = time.time() + 240
    while not (run_dir / "wide" / "checkpoint.pt").exists():
        assert cluster.job(job)["JobState"] in ("PENDING", "RUNNING"), log.read_text()[-4000:]
        assert time.time() < deadline, "no checkpoint within 240 s"
        time.sleep(0.05)
    lost_at = hosts[1].lose()
    deadline = time.time() + 180
    while (info := cluster.job(job))["Restarts"] == "0":
        assert time.time() < deadline, (info, log.read_text()[-4000:])
        time.sleep(0.5)
    requeued = time.time() - lost_at
    hosts[1].link(True)
    cluster.start_slurmd(hosts[1])
    info = cluster.wait(job)
    text = log.read_text()
    assert info["JobState"] == "COMPLETED", text[-4000:]
    assert "resuming wide at phase 0 (wide), step " in text, text[-4000:]
    resumed = checkpoint.load(run_dir / "wide" / "model.pt")["state_dict"]
    reference = checkpoint.load(straight_run / "wide" / "model.pt")["state_dict"]
    for name, tensor in reference.items():
        assert torch.equal(resumed[name], tensor), name
    print(f"node gwtn-h2 lost; job {job} requeued after {requeued:.1f} s, completed after "
          f"{time.time() - lost_at:.1f} s with {info['Restarts']} restart(s)")
