"""Distributed runs across real processes on CPU: DeepSpeed (DS_ACCELERATOR=cpu) over gloo.

Every test launches ``python -m gwtn_dist`` under torchrun, as a user would. The tiny config on
the tests' synthetic shards keeps each launch to tens of seconds on 2 cores.
"""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from gwtn_dist import checkpoint
from gwtn_dist.config import load_config
from gwtn_dist.models.family import build_thin

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "configs" / "tiny_cpu.yaml")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(nproc: int, args: list[str], *, port: int | None = None, nnodes: int = 1,
             node_rank: int = 0) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
            f"--nnodes={nnodes}", f"--node-rank={node_rank}", "--master-addr=127.0.0.1",
            f"--master-port={port or free_port()}", "-m", "gwtn_dist", "-q", *args]


def env() -> dict:
    # One thread per rank: the ranks share the machine's cores.
    return {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1",
            "PYTHONWARNINGS": "ignore"}


def run(cmd: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=timeout,
                          check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


def tiny(shard_dir: Path, run_dir: Path, *extra: str) -> list[str]:
    return [TINY, f"run_dir={run_dir}", f"data.shards={shard_dir}", "progress=false",
            "threads=1", "eval_every=0", "data.train_samples=0", *extra]


def losses(stage_dir: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (stage_dir / "metrics.jsonl").read_text()
            .splitlines()]


SHARDED = ["dist.wide_zero_stage=3", "dist.teacher=shard", "checkpoint.every=7"]


@pytest.fixture(scope="module")
def two_rank_run(tmp_path_factory, shard_dir) -> Path:
    """All three stages and the scratch baseline on 2 ranks: ZeRO-3 wide, sharded teacher."""
    run_dir = tmp_path_factory.mktemp("dist") / "run"
    run(torchrun(2, ["run", *tiny(shard_dir, run_dir, *SHARDED)]))
    return run_dir


def test_two_ranks_run_all_three_stages_with_a_sharded_teacher(two_rank_run):
    summary = json.loads((two_rank_run / "summary.json").read_text())["stages"]
    assert set(summary) == {"wide", "imitate", "finetune", "scratch"}
    for stage, record in summary.items():
        assert record["world_size"] == 2
        assert (two_rank_run / stage / "DONE").is_file()
        assert record["test_samples"] == 300  # every test sample scored once over both ranks
    configs = json.loads((two_rank_run / "wide" / "deepspeed_config.json").read_text())
    assert configs["wide"]["zero_optimization"]["stage"] == 3
    assert configs["wide"]["train_micro_batch_size_per_gpu"] * 2 == 64  # the global batch
    teacher = summary["imitate"]["teacher"]
    assert teacher["mode"] == "shard" and teacher["world_size"] == 2
    assert teacher["param_bytes_per_rank"] <= 0.6 * teacher["param_bytes_total"]
    # The hand-off is consolidated: the thin net loads on one process and scores like the run.
    cfg = load_config(TINY)
    thin = build_thin(cfg.model)
    checkpoint.load_weights(thin, two_rank_run / "finetune" / "model.pt")
    assert summary["finetune"]["test_accuracy"] > 0.3  # 10 classes: chance is 0.1


def test_four_ranks_hold_a_third_of_the_teacher_or_less(tmp_path, two_rank_run, shard_dir):
    # Stage 1 of the 2-rank run is reused; imitation alone runs on 4 ranks.
    run_dir = tmp_path / "run4"
    (run_dir / "wide").mkdir(parents=True)
    for name in ("model.pt", "stage.json", "DONE"):
        (run_dir / "wide" / name).write_bytes((two_rank_run / "wide" / name).read_bytes())
    run(torchrun(4, ["imitate", *tiny(shard_dir, run_dir, *SHARDED,
                                      "imitate.steps_per_point=2")]))
    teacher = json.loads((run_dir / "imitate" / "stage.json").read_text())["teacher"]
    assert teacher["world_size"] == 4
    assert teacher["param_bytes_per_rank"] <= 0.35 * teacher["param_bytes_total"]


def test_two_ranks_imitate_in_parallel_with_a_sharded_teacher(tmp_path, two_rank_run,
                                                             shard_dir):
    # Stage 1 of the 2-rank run is reused; the parallel schedule (and its polish) runs under
    # DeepSpeed with the thin net at ZeRO-2 and the teacher sharded, then fine-tuning.
    run_dir = tmp_path / "parallel"
    (run_dir / "wide").mkdir(parents=True)
    for name in ("model.pt", "stage.json", "DONE"):
        (run_dir / "wide" / name).write_bytes((two_rank_run / "wide" / name).read_bytes())
    args = tiny(shard_dir, run_dir, *SHARDED, "dist.student_zero_stage=2",
                "imitate.schedule=parallel", "imitate.steps_per_point=4",
                "imitate.parallel_polish_steps=1", "finetune.kd_steps=2",
                "finetune.label_steps=4")
    run(torchrun(2, ["imitate", *args]))
    run(torchrun(2, ["finetune", *args]))
    imit = json.loads((run_dir / "imitate" / "stage.json").read_text())
    assert imit["teacher"]["mode"] == "shard" and imit["world_size"] == 2
    assert imit["steps"] == 3 * 4 and set(imit["relative_error"]) == set(imit["points"])
    configs = json.loads((run_dir / "imitate" / "deepspeed_config.json").read_text())
    assert configs["imitate/parallel"]["zero_optimization"]["stage"] == 2
    assert len(losses(run_dir / "imitate")) == 3 * 4
    assert (run_dir / "finetune" / "DONE").is_file()


def test_two_ranks_compute_what_one_rank_does_with_the_whole_batch(tmp_path, shard_dir):
    """2 ranks × 32 against 1 rank × 64 (both DeepSpeed, global-batch BN), lr 0.02, 10 steps.

    The ranks see the same samples and augmentations and BN statistics span both, so the
    losses differ only by float summation order, which training amplifies step by step:
    measured 0 to 5e-8 over the first 3 steps and 2.3e-4 by step 10.
    """
    common = ["wide.steps=10", "wide.optim.lr=0.02", "dist.engine=deepspeed"]
    run(torchrun(2, ["wide", *tiny(shard_dir, tmp_path / "two", *common)]))
    run(torchrun(1, ["wide", *tiny(shard_dir, tmp_path / "one", *common)]))
    two, one = losses(tmp_path / "two" / "wide"), losses(tmp_path / "one" / "wide")
    assert len(two) == len(one) == 10
    rel = [abs(a - b) / abs(b) for a, b in zip(two, one, strict=True)]
    assert max(rel[:3]) < 1e-5, rel
    assert max(rel) < 3e-3, rel


def test_stages_hand_off_across_world_sizes(tmp_path, shard_dir):
    """Stage 1 on 4 ranks, stage 2 on 2, stage 3 on 1: model.pt is independent of world size."""
    run_dir = tmp_path / "run"
    args = tiny(shard_dir, run_dir, "wide.steps=8", "imitate.steps_per_point=3",
                "finetune.kd_steps=2", "finetune.label_steps=4", "dist.wide_zero_stage=3")
    run(torchrun(4, ["wide", *args]))
    run(torchrun(2, ["imitate", *args]))
    run([sys.executable, "-m", "gwtn_dist", "-q", "finetune", *args])
    sizes = {s: json.loads((run_dir / s / "stage.json").read_text())["world_size"]
             for s in ("wide", "imitate", "finetune")}
    assert sizes == {"wide": 4, "imitate": 2, "finetune": 1}


def test_two_nodes_rendezvous_on_localhost(tmp_path, shard_dir):
    port = free_port()
    args = ["wide", *tiny(shard_dir, tmp_path / "run", "wide.steps=4")]
    nodes = [subprocess.Popen(torchrun(1, args, port=port, nnodes=2, node_rank=rank), env=env(),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for rank in (0, 1)]
    outputs = [node.communicate(timeout=300)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], outputs
    record = json.loads((tmp_path / "run" / "wide" / "stage.json").read_text())
    assert record["world_size"] == 2 and record["steps"] == 4


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.communicate()[0][-3000:]
        assert time.time() < deadline, f"{path} did not appear"
        time.sleep(0.2)


def test_a_killed_rank_stops_the_job_which_then_resumes_to_the_same_weights(
        tmp_path, two_rank_run, shard_dir):
    """SIGKILL one rank after the wide stage's first DeepSpeed checkpoint (ZeRO-3, mid-phase):
    the job exits non-zero without hanging; ``resume=true`` on 2 ranks finishes the stage with
    the weights of the uninterrupted 2-rank run."""
    run_dir = tmp_path / "run"
    args = ["wide", *tiny(shard_dir, run_dir, *SHARDED)]
    job = subprocess.Popen(torchrun(2, args), env=env(), stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True, start_new_session=True)
    _wait_for(run_dir / "wide" / "checkpoint.pt", job)
    # torchrun's workers are its children.
    children = subprocess.run(["pgrep", "-P", str(job.pid)], capture_output=True, text=True,
                              check=True).stdout
    ranks = [int(p) for p in children.split()]
    assert len(ranks) == 2, ranks
    os.kill(max(ranks), signal.SIGKILL)
    started = time.time()
    try:
        job.communicate(timeout=120)
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
    assert job.returncode != 0
    assert time.time() - started < 120
    saved = checkpoint.load(run_dir / "wide" / "checkpoint.pt")
    assert "deepspeed_tag" in saved["engine"] and "modules" not in saved  # partitioned, mid-phase
    tags = [p.name for p in (run_dir / "wide" / "deepspeed").iterdir()]
    assert saved["engine"]["deepspeed_tag"] in tags  # older tags go only after the pointer moves

    run(torchrun(2, [*args, "resume=true"]))
    (resume,) = json.loads((run_dir / "wide" / "stage.json").read_text())["resumes"]
    assert resume["step"] == saved["step"] >= 1 and resume["world_size"] == 2  # continued
    resumed = checkpoint.load(run_dir / "wide" / "model.pt")["state_dict"]
    reference = checkpoint.load(two_rank_run / "wide" / "model.pt")["state_dict"]
    for name, tensor in reference.items():
        assert torch.equal(resumed[name], tensor), name


def test_image_folder_shards_train_all_stages_on_two_ranks(tmp_path):
    """JPEG class folders → ``gwtn shards imagefolder`` → the three stages on 2 ranks, each rank
    reading its own share of the epoch; every val image is scored once."""
    from test_data_imagefolder import make_image_folder

    expected = make_image_folder(tmp_path / "folder", {"train": 8, "val": 3})
    shards = tmp_path / "shards"
    run([sys.executable, "-m", "gwtn_dist", "-q", "shards", "imagefolder",
         str(tmp_path / "folder"), str(shards)])
    run_dir = tmp_path / "run"
    # The tiny config with an image folder's data section (its Fashion-MNIST keys, such as
    # val_samples, are no keys of an image folder's).
    tree = yaml.safe_load(Path(TINY).read_text())
    tree["data"] = {"dataset": "imagefolder", "shards": str(shards), "image_size": 32,
                    "eval_resize": 36, "batch_size": 8, "eval_batch_size": 4,
                    "shuffle_buffer": 16}
    (tmp_path / "images.yaml").write_text(yaml.safe_dump(tree))
    run(torchrun(2, ["run", str(tmp_path / "images.yaml"), f"run_dir={run_dir}",
                     "model.in_channels=3", "model.num_classes=3", "progress=false",
                     "threads=1", "eval_every=0", "wide.steps=6", "imitate.steps_per_point=2",
                     "finetune.kd_steps=2", "finetune.label_steps=2"]))
    summary = json.loads((run_dir / "summary.json").read_text())["stages"]
    assert set(summary) == {"wide", "imitate", "finetune", "scratch"}
    for record in summary.values():
        assert record["world_size"] == 2
        assert record["test_samples"] == sum(expected["val"].values())


def test_bf16_training_hands_off_fp32_master_weights(tmp_path, shard_dir):
    """DeepSpeed trains a bf16 copy; model.pt holds the optimizer's fp32 master weights (not
    bf16-rounded values), and the next stage runs from it with a sharded bf16 teacher."""
    args = tiny(shard_dir, tmp_path / "run", "wide.steps=4", "imitate.steps_per_point=2",
                "dist.precision=bf16", "dist.teacher=shard")
    run(torchrun(2, ["wide", *args]))
    run(torchrun(2, ["imitate", *args]))
    state = checkpoint.load(tmp_path / "run" / "wide" / "model.pt")["state_dict"]
    weights = [v for k, v in state.items() if k.endswith("conv1.weight")]
    assert weights and all(w.dtype == torch.float32 for w in weights)
    # fp32 masters after 4 SGD steps are not all representable in bf16.
    assert any(not torch.equal(w, w.bfloat16().float()) for w in weights)
    record = json.loads((tmp_path / "run" / "imitate" / "stage.json").read_text())
    assert record["teacher"]["mode"] == "shard"


def test_without_a_launcher_the_survivor_of_a_killed_rank_exits(tmp_path, shard_dir):
    """Ranks started by hand (as plain srun does, one task per rank, no torchrun to reap them):
    when one dies, the other fails its next collective instead of hanging (dist.timeout_s)."""
    port = free_port()
    args = [sys.executable, "-m", "gwtn_dist", "-q", "wide",
            *tiny(shard_dir, tmp_path / "run", "checkpoint.every=5", "dist.timeout_s=30")]
    ranks = [subprocess.Popen(args, env={**env(), "RANK": str(r), "LOCAL_RANK": str(r),
                                         "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
                                         "MASTER_PORT": str(port)},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for r in (0, 1)]
    try:
        _wait_for(tmp_path / "run" / "wide" / "checkpoint.pt", ranks[0])
        ranks[1].kill()
        started = time.time()
        ranks[0].communicate(timeout=90)
        assert ranks[0].returncode != 0
        assert time.time() - started < 90
    finally:
        for proc in ranks:
            if proc.poll() is None:
                proc.kill()


def test_a_save_that_fails_on_rank_0_stops_every_rank_at_once(tmp_path, shard_dir):
    """Rank 0 cannot write its second checkpoint (the name it would move the first one to is a
    folder); every rank stops right after that save with its own one-line error, long before
    dist.timeout_s, and nothing is left half-written."""
    run_dir = tmp_path / "run"
    (run_dir / "wide" / "checkpoint.prev.pt" / "in-the-way").mkdir(parents=True)
    start = time.monotonic()
    proc = subprocess.run(
        torchrun(2, ["wide", *tiny(shard_dir, run_dir, "wide.steps=20", "checkpoint.every=5",
                                   "dist.timeout_s=900")]),
        env=env(), capture_output=True, text=True, timeout=600, check=False)
    took = time.monotonic() - start
    errors = [line for line in proc.stderr.splitlines() if line.startswith("gwtn: error:")]
    assert proc.returncode != 0 and took < 300, proc.stderr[-3000:]
    assert len(errors) == 2, proc.stderr[-3000:]  # each rank stopped by itself, not killed
    assert any("rank 0 could not write" in line for line in errors)
    saved = torch.load(run_dir / "wide" / "checkpoint.pt", weights_only=True)
    assert saved["step"] == 5  # the first save is intact


def test_two_ranks_accumulate_two_micro_batches_per_step_with_lamb(tmp_path, shard_dir):
    """optim.accumulate=2 under DeepSpeed on 2 ranks: each rank's 32 samples run as 2
    micro-batches of 16 (gradient_accumulation_steps 2) and training proceeds; the optimizer is
    LAMB, which DeepSpeed runs at ZeRO stage 0 on whole parameters."""
    run_dir = tmp_path / "run"
    run(torchrun(2, ["wide", *tiny(shard_dir, run_dir, "wide.steps=6",
                                   "wide.optim.accumulate=2", "wide.optim.name=lamb",
                                   "wide.optim.lr=0.004", "wide.optim.weight_decay=0.01",
                                   "dist.wide_zero_stage=0")]))
    config = json.loads((run_dir / "wide" / "deepspeed_config.json").read_text())["wide"]
    assert config["gradient_accumulation_steps"] == 2
    assert config["train_micro_batch_size_per_gpu"] == 16 and config["train_batch_size"] == 64
    values = losses(run_dir / "wide")
    assert len(values) == 6 and all(math.isfinite(v) for v in values)


class _Marker:
    """A pickle that, loaded unsafely, creates the file ``path`` (what an attacker's would run)."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


def test_a_crafted_pickle_in_a_deepspeed_checkpoint_runs_no_code(tmp_path, shard_dir):
    """DeepSpeed's own loader reads with weights_only=False; ours makes it read safely. A
    resume from a DeepSpeed tag holding a ``__reduce__`` object stops with one line and exit 4,
    the object never run; with the tag's real files the same resume ends with the weights of
    the uninterrupted run (ZeRO-2's optimizer state loads under the allowed classes)."""
    run_dir = tmp_path / "run"
    args = ["wide", *tiny(shard_dir, run_dir, "dist.engine=deepspeed", "wide.steps=6",
                          "checkpoint.every=3")]
    run(torchrun(1, args))
    stage = run_dir / "wide"
    reference = checkpoint.load(stage / "model.pt")["state_dict"]
    # Back to the mid-phase checkpoint the finished stage kept (step 3, pointing to a DeepSpeed
    # tag), as if the run had stopped there.
    os.replace(stage / "checkpoint.prev.pt", stage / "checkpoint.pt")
    for name in ("DONE", "model.pt", "stage.json"):
        (stage / name).unlink()
    tag = stage / "deepspeed" / checkpoint.load(stage / "checkpoint.pt")["engine"]["deepspeed_tag"]
    states = tag / "mp_rank_00_model_states.pt"
    original = states.read_bytes()
    marker = tmp_path / "code-ran"
    torch.save({**torch.load(states, weights_only=True), "extra": _Marker(marker)}, states)

    proc = subprocess.run(torchrun(1, [*args, "resume=true"]), env=env(), capture_output=True,
                          text=True, timeout=300, check=False)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("gwtn:")]
    assert proc.returncode != 0 and not marker.exists(), proc.stderr[-3000:]
    assert errors == [(f"gwtn: error: DeepSpeed checkpoint {tag} cannot be read safely (it "
                       f"holds a Python object (posix.system), not plain tensors, and gwtn runs "
                       f"no code from a file); it is torn, corrupt, or not written by gwtn")], \
        errors
    assert "exitcode: 4" in proc.stderr  # torchrun's report of the rank's exit code

    states.write_bytes(original)
    run(torchrun(1, [*args, "resume=true"]))
    (resume,) = json.loads((stage / "stage.json").read_text())["resumes"]
    assert resume["step"] == 3
    resumed = checkpoint.load(stage / "model.pt")["state_dict"]
    for name, tensor in reference.items():
        assert torch.equal(resumed[name], tensor), name
