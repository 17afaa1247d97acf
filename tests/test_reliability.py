"""Nothing lost, nothing silent: safe loading, a torn checkpoint or metrics line, and one clear
line with a documented exit code for inputs that cannot work."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from gwtn_dist import checkpoint
from gwtn_dist.cli import EXIT_CHECKPOINT, EXIT_DIVERGED, EXIT_IO, main
from gwtn_dist.stages.loop import MetricsLog
from tests.conftest import REPO
from tests.test_pipeline import fast_args


class Exploit:
    def __reduce__(self):
        return (print, ("this ran code",))


def test_files_that_are_not_plain_tensors_are_refused(tmp_path):
    path = tmp_path / "model.pt"
    torch.save({"state_dict": {}, "meta": Exploit()}, path)
    with pytest.raises(checkpoint.CheckpointError, match="cannot be read safely") as refused:
        checkpoint.load(path)
    # What the file held, never torch's advice to load it with weights_only=False.
    assert "it holds a Python object (print)" in str(refused.value)
    assert "False" not in str(refused.value) and "Re-running" not in str(refused.value)
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(checkpoint.CheckpointError, match="junk.pt"):
        checkpoint.load(tmp_path / "junk.pt")


def test_a_torn_newest_checkpoint_falls_back_to_the_previous_one(tmp_path):
    path = tmp_path / "checkpoint.pt"
    checkpoint.atomic_save({"step": 1}, path, keep_previous=True)
    checkpoint.atomic_save({"step": 2}, path, keep_previous=True)
    assert checkpoint.load(checkpoint.previous_path(path)) == {"step": 1}
    path.write_bytes(path.read_bytes()[:20])  # torn
    assert checkpoint.load_with_fallback(path) == {"step": 1}
    checkpoint.previous_path(path).unlink()
    with pytest.raises(checkpoint.CheckpointError):
        checkpoint.load_with_fallback(path)


def test_a_torn_metrics_line_does_not_stop_a_resume(tmp_path):
    path = tmp_path / "metrics.jsonl"
    lines = [json.dumps({"phase_index": 0, "step": i}) for i in range(1, 6)]
    path.write_text("\n".join(lines) + '\n{"phase_index": 0, "st')  # killed mid-write
    MetricsLog(path).truncate_after(0, 3)
    assert [json.loads(x)["step"] for x in path.read_text().splitlines()] == [1, 2, 3]


def test_a_diverging_run_stops_with_one_line_and_no_new_checkpoint(tmp_path, shard_dir, capsys):
    run_dir = tmp_path / "run"
    code = main(["-q", "wide", *fast_args(run_dir, shard_dir, "wide.optim.lr=1e30",
                                           "wide.optim.momentum=0")])
    err = capsys.readouterr().err
    assert code == EXIT_DIVERGED and err.startswith("gwtn: error: training diverged")
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    saved = torch.load(run_dir / "wide" / "checkpoint.pt", weights_only=True) \
        if (run_dir / "wide" / "checkpoint.pt").is_file() else None
    assert saved is None or all(torch.isfinite(v).all()
                                for v in saved["modules"]["wide"].values() if v.is_floating_point())


def test_an_unreadable_checkpoint_and_an_unwritable_run_dir_are_one_line(tmp_path, shard_dir,
                                                                          capsys):
    run_dir = tmp_path / "run"
    (run_dir / "wide").mkdir(parents=True)
    (run_dir / "wide" / "checkpoint.pt").write_bytes(b"torn")
    assert main(["-q", "wide", *fast_args(run_dir, shard_dir)]) == EXIT_CHECKPOINT
    assert "checkpoint.pt cannot be read safely" in capsys.readouterr().err
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    assert main(["-q", "wide", *fast_args(blocker / "run", shard_dir)]) == EXIT_IO
    err = capsys.readouterr().err
    assert err.startswith("gwtn: error:") and "a-file" in err and "Traceback" not in err


class WritesRecorder:
    """A stderr stand-in that keeps each ``write`` call apart."""

    def __init__(self):
        self.writes: list[str] = []

    def write(self, text: str) -> int:
        self.writes.append(text)
        return len(text)

    def flush(self) -> None:
        pass


def test_an_error_line_reaches_stderr_in_one_write(tmp_path, shard_dir, monkeypatch):
    """Ranks share one stderr under torchrun or srun; a line written in two parts (``print``
    writes its newline apart) can be run together with another rank's line."""
    recorder = WritesRecorder()
    monkeypatch.setattr(sys, "stderr", recorder)
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    assert main(["-q", "wide", *fast_args(blocker / "run", shard_dir)]) == EXIT_IO
    errors = [w for w in recorder.writes if "gwtn: error:" in w]
    assert len(errors) == 1 and errors[0].startswith("gwtn: error:") and errors[0].endswith("\n")


@pytest.mark.parametrize("override, words", [
    ("device=cuda", ["device", "no CUDA device"]),
    ("imitate.loss_backend=triton", ["imitate.loss_backend", "CUDA"]),
])
def test_a_device_or_backend_that_is_not_here_is_a_config_error(tmp_path, override, words):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    # A fresh process without the suite's TRITON_INTERPRET, as a user would run it.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "gwtn_dist", "-q", "wide",
                           str(REPO / "configs/tiny_cpu.yaml"), f"run_dir={tmp_path}/r",
                           override], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=120, check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert all(w in proc.stderr for w in words) and len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "r" / "wide").exists()  # refused before any training


def test_skipped_bad_samples_reach_stage_json_and_summary(tmp_path, shard_dir):
    from tests.test_data import _with_undecodable_samples

    bad = _with_undecodable_samples(shard_dir, tmp_path / "bad", count=2)
    run_dir = tmp_path / "run"
    # 1200 − 2 good images at batch 32 are 37 full batches: one epoch reads every sample once.
    assert main(["-q", "wide", *fast_args(run_dir, bad, "wide.steps=37",
                                          "data.val_samples=0")]) == 0
    record = json.loads((run_dir / "wide" / "stage.json").read_text())
    assert record["skipped_samples"] == {"undecodable sample": 2}
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["skipped_samples"] == {"undecodable sample": 2}


def _sum_counts_worker(rank: int, port: int, queue) -> None:
    import torch.distributed as dist

    from gwtn_dist.distributed import runtime

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    mine = {"undecodable sample": 1, "truncated tar": 2} if rank == 0 else {"truncated tar": 3}
    total = runtime.sum_counts(mine)
    queue.put((rank, total))
    dist.destroy_process_group()


def test_per_rank_skip_counts_are_summed_over_ranks():
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    queue = mp.get_context("spawn").Queue()
    mp.spawn(_sum_counts_worker, args=(port, queue), nprocs=2)
    totals = dict(queue.get(timeout=10) for _ in range(2))
    assert totals[0] == totals[1] == {"undecodable sample": 1, "truncated tar": 5}


# Ctrl-C and SIGTERM: a checkpoint at the next step, one line, exit 75, the lock released, and a
# resume that ends with the weights of a run never stopped.

STOP_ARGS = ["progress=false", "threads=1", "eval_every=0", "wide.steps=60", "checkpoint.every=5",
             "data.train_samples=0"]


def _wide_command(run_dir, shard_dir, *extra: str) -> list[str]:
    return [sys.executable, "-m", "gwtn_dist", "-q", *extra, "wide",
            str(REPO / "configs/tiny_cpu.yaml"), f"run_dir={run_dir}", f"data.shards={shard_dir}",
            *STOP_ARGS]


@pytest.fixture(scope="module")
def straight_wide(tmp_path_factory, shard_dir) -> dict:
    """The wide stage's weights from a run that was never stopped."""
    run_dir = tmp_path_factory.mktemp("straight") / "run"
    proc = subprocess.run(_wide_command(run_dir, shard_dir), cwd=REPO, capture_output=True,
                          text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return checkpoint.load(run_dir / "wide" / "model.pt")["state_dict"]


@pytest.mark.parametrize("how", ["SIGINT", "SIGTERM", "SIGTERM to gwtn launch"])
def test_ctrl_c_and_sigterm_stop_at_a_checkpoint_that_resumes_bit_exact(
        tmp_path, shard_dir, straight_wide, how):
    """The signal while the wide stage trains (to the process itself, or to ``gwtn launch``,
    which asks its ranks through the run's stop file and does not requeue)."""
    run_dir = tmp_path / "run"
    launcher = ["launch", "--style", "local", "--"] if "launch" in how else []
    cmd = _wide_command(run_dir, shard_dir)
    if launcher:
        cmd = cmd[:4] + launcher + cmd[4:]
    job = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True)
    deadline = time.time() + 240
    while not (run_dir / "wide" / "checkpoint.pt").exists():
        assert job.poll() is None and time.time() < deadline, job.communicate()[1][-3000:]
        time.sleep(0.05)
    job.send_signal(getattr(signal, how.split()[0]))
    _, err = job.communicate(timeout=240)
    assert job.returncode == 75, err[-3000:]
    lines = [line for line in err.strip().splitlines() if line.startswith("gwtn:")]
    assert len(lines) == 1 and lines[0].startswith("gwtn: stopped on request after step "), err
    assert "Traceback" not in err and not (run_dir / ".lock").exists()
    stopped_at = checkpoint.load(run_dir / "wide" / "checkpoint.pt")["step"]
    assert 5 <= stopped_at < 60

    proc = subprocess.run(_wide_command(run_dir, shard_dir), cwd=REPO, capture_output=True,
                          text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (resume,) = json.loads((run_dir / "wide" / "stage.json").read_text())["resumes"]
    assert resume["step"] == stopped_at
    resumed = checkpoint.load(run_dir / "wide" / "model.pt")["state_dict"]
    for name, tensor in straight_wide.items():
        assert torch.equal(resumed[name], tensor), name


def test_a_second_ctrl_c_stops_at_once_and_outside_training_too(tmp_path):
    """The first SIGINT asks for a checkpoint (a flag the loop reads at the step's end); a
    second one while it is pending raises Interrupted at once (exit 130: 128 + SIGINT).
    Before training starts, SIGTERM ends a command the same way, with one line."""
    from gwtn_dist.distributed import preempt
    from gwtn_dist.distributed.runtime import Runtime

    before = signal.getsignal(signal.SIGINT)  # SIG_IGN when pytest runs as a background job
    preempt.install(tmp_path, Runtime())
    try:
        os.kill(os.getpid(), signal.SIGINT)
        assert preempt.asked_here()
        with pytest.raises(preempt.Interrupted) as caught:
            os.kill(os.getpid(), signal.SIGINT)
        assert caught.value.exit_code == 130 and "without a checkpoint" in str(caught.value)
    finally:
        preempt.restore()
    assert signal.getsignal(signal.SIGINT) is before  # given back

    proc = subprocess.Popen([sys.executable, "-c", (
        "import os, signal, sys; from gwtn_dist.cli import main; "
        "from gwtn_dist import cli; cli._load = lambda *a, **k: os.kill(os.getpid(), "
        "signal.SIGTERM); sys.exit(main(['wide', 'c.yaml']))")],
        cwd=REPO, stderr=subprocess.PIPE, text=True)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143 and err.strip() == "gwtn: SIGTERM: stopped", err


# The run folder's lock: never held by two processes at once.

RACERS, TRIALS = 12, 200


def _race(lock_path, start, decided, results) -> None:
    """One contender: every trial, acquire at the barrier, report, hold until every contender
    has decided, release."""
    from gwtn_dist.workers import FileLock

    for _ in range(TRIALS):
        start.wait()
        lock = FileLock(lock_path)
        results.put(lock.acquire())
        decided.wait()
        lock.release()
        start.wait()


def test_racing_processes_never_both_hold_the_lock(tmp_path):
    """12 processes call FileLock.acquire at the same moment, 200 times; every other trial
    starts from a stale lock (a dead process of this host). Exactly one must hold it each time.
    (The lock before this change: 16 of 1000 such trials had two or more holders.)"""
    import multiprocessing
    import socket

    ctx = multiprocessing.get_context("fork")
    start, decided = ctx.Barrier(RACERS + 1), ctx.Barrier(RACERS + 1)
    results = ctx.Queue()
    lock_path = tmp_path / "run" / ".lock"
    racers = [ctx.Process(target=_race, args=(lock_path, start, decided, results))
              for _ in range(RACERS)]
    for p in racers:
        p.start()
    dead = subprocess.Popen(["true"])
    dead.wait()
    holders = []
    try:
        for trial in range(TRIALS):
            lock_path.parent.mkdir(exist_ok=True)
            if trial % 2:
                lock_path.write_text(json.dumps({"host": socket.gethostname(), "pid": dead.pid}))
            start.wait(timeout=60)
            holders.append(sum(results.get(timeout=60) for _ in range(RACERS)))
            decided.wait(timeout=60)
            start.wait(timeout=60)
            assert not lock_path.exists()  # the holder released it
    finally:
        for p in racers:
            p.join(timeout=60)
            if p.is_alive():
                p.kill()
    assert holders == [1] * TRIALS, {n: holders.count(n) for n in set(holders)}


def test_a_lock_is_taken_over_only_from_the_dead_and_released_only_by_its_holder(tmp_path):
    from gwtn_dist.workers import FileLock

    path = tmp_path / ".lock"
    path.write_text("")  # unreadable (an older gwtn killed mid-write): stale
    first = FileLock(path)
    assert first.acquire() and first.holder()["pid"] == os.getpid()
    assert not FileLock(path).acquire()  # held by a live process (this one)
    path.write_text(json.dumps({"host": "another-host", "pid": 1}))  # replaced behind its back
    first.release()
    assert path.exists()  # not its lock any more: left alone
    assert not FileLock(path).acquire()  # another host's holder cannot be checked: busy
    assert [p.name for p in tmp_path.iterdir() if p.name != ".lock.guard"] == [".lock"]


# Files that torch reads but that are not what they should be: one line naming the file, exit 4.


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, shard_dir):
    """A finished run of the three stages (no baseline) to damage copies of."""
    run_dir = tmp_path_factory.mktemp("finished") / "run"
    assert main(["-q", "run", *fast_args(run_dir, shard_dir, "arms=[win]")]) == 0
    return run_dir


def _narrowed(state: dict) -> dict:
    """``state`` with its first weight cut to half its output channels (another net's)."""
    name = next(k for k, v in state.items() if v.ndim == 4)
    return {**state, name: state[name][: state[name].shape[0] // 2]}


def _again(finished_run, tmp_path, shard_dir, capsys, damage, command="wide", undo=()):
    """Damage a copy of the run (``damage(run_dir)``), remove ``undo``'s DONE files, run
    ``gwtn COMMAND`` in it: the exit code and the one line it printed."""
    run_dir = tmp_path / "run"
    shutil.copytree(finished_run, run_dir)
    for stage in undo:
        (run_dir / stage / "DONE").unlink()
    damage(run_dir)
    code = main(["-q", command, *fast_args(run_dir, shard_dir, "arms=[win]")])
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    return code, err.strip()


@pytest.mark.parametrize("content, words", [
    ("narrowed", "but the net's has (8, 1, 3, 3): it holds a net of another shape"),
    ({"a": 1}, "is not a checkpoint of this stage (no stream)"),
    (torch.zeros(3), "is not a checkpoint of this stage (it holds a Tensor, not a mapping)"),
])
def test_a_checkpoint_of_another_shape_or_kind_is_refused(finished_run, tmp_path, shard_dir,
                                                          capsys, content, words):
    def damage(run_dir):
        path = run_dir / "wide" / "checkpoint.pt"
        if content == "narrowed":
            state = checkpoint.load(path)
            state["modules"]["wide"] = _narrowed(state["modules"]["wide"])
            torch.save(state, path)
        else:
            torch.save(content, path)

    code, line = _again(finished_run, tmp_path, shard_dir, capsys, damage, undo=["wide"])
    assert code == EXIT_CHECKPOINT
    assert line.startswith(f"gwtn: error: {tmp_path / 'run' / 'wide' / 'checkpoint.pt'}")
    assert words in line


@pytest.mark.parametrize("stage, command", [("wide", "imitate"), ("imitate", "finetune")])
def test_a_stage_model_of_another_shape_is_refused_by_the_next_stage(
        finished_run, tmp_path, shard_dir, capsys, stage, command):
    def damage(run_dir):
        path = run_dir / stage / "model.pt"
        blob = checkpoint.load(path)
        torch.save({**blob, "state_dict": _narrowed(blob["state_dict"])}, path)
        shutil.rmtree(run_dir / command)

    code, line = _again(finished_run, tmp_path, shard_dir, capsys, damage, command=command)
    assert code == EXIT_CHECKPOINT
    assert line.startswith(f"gwtn: error: {tmp_path / 'run' / stage / 'model.pt'}: ")
    assert "it holds a net of another shape" in line


@pytest.mark.parametrize("shape, words", [
    ({"inner_widths": [-4, 8, 8]}, "the shape it records cannot be built"),
    ("x", "the shape it records cannot be built"),
    (None, "the shape it records cannot be built"),
    ({"blocks": [2, 2, 2]}, "lacks layer1.1.conv1.weight: it holds another net's weights"),
    ({"blocks": [10**9, 1, 1]}, "the shape it records cannot be built"),
])
def test_export_of_a_crafted_shape_is_one_line_naming_the_file(finished_run, tmp_path, capsys,
                                                               shape, words):
    blob = checkpoint.load(finished_run / "finetune" / "model.pt")
    meta = blob["meta"]
    meta["shape"] = {**meta["shape"], **shape} if isinstance(shape, dict) else shape
    crafted = tmp_path / "crafted.pt"
    torch.save(blob, crafted)
    code = main(["export", str(crafted), str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert code == EXIT_CHECKPOINT and err.startswith(f"gwtn: error: {crafted}") and words in err
    assert len(err.splitlines()) == 1 and not (tmp_path / "out").exists()


# A full disk: one line naming the file, exit 74, no temporary file left, and the run resumes
# once there is room again.


@pytest.fixture
def small_disk(tmp_path):
    """A 2 MiB tmpfs (where this process may mount one: root), else None."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs",
                                            str(disk)], capture_output=True,
                                           check=False).returncode != 0:
        yield None
        return
    try:
        yield disk
    finally:
        subprocess.run(["umount", str(disk)], check=False)


def _leave_free(disk, kib: int) -> None:
    """Fill ``disk`` up to ``kib`` KiB of free space."""
    free = shutil.disk_usage(disk).free - kib * 1024
    with open(disk / "filler", "wb") as f:
        try:
            f.write(b"\0" * max(free, 0))
        except OSError:
            pass


def _temporaries(folder) -> list:
    return [p for p in folder.rglob("*") if "tmp" in p.name]


def test_a_full_disk_ends_in_one_line_and_exit_74_wherever_it_strikes(small_disk, tmp_path,
                                                                      shard_dir, capsys,
                                                                      monkeypatch):
    """On a 2 MiB tmpfs left with 0 KiB, 8 KiB, 40 % and 90 % of the room the stage needs, the
    wide stage runs out of it at a different write each time (the lock, config.yaml,
    metrics.jsonl, a checkpoint, model.pt).
    Without a tmpfs (not root), torch's writer is made to fail as it does on a full disk
    (``RuntimeError: … unexpected pos``, with no space left)."""
    if small_disk is None:
        calls = []

        def failing_save(obj, f, *args, **kwargs):
            calls.append(1)
            if len(calls) == 2:  # the second checkpoint
                f.write(b"PK\3\4 partial")
                raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos")
            return torch_save(obj, f, *args, **kwargs)

        torch_save = torch.save
        monkeypatch.setattr(checkpoint.torch, "save", failing_save)
        monkeypatch.setattr(checkpoint.shutil, "disk_usage",
                            lambda path: shutil._ntuple_diskusage(1 << 30, 1 << 30, 0))
        levels, disk = [None], tmp_path
    else:
        disk = small_disk
        args = fast_args(disk / "run", shard_dir, "wide.steps=10", "eval_every=0")
        assert main(["-q", "wide", *args]) == 0
        needs = sum(p.stat().st_size for p in (disk / "run").rglob("*") if p.is_file()) // 1024
        shutil.rmtree(disk / "run")
        levels = [0, 8, needs * 40 // 100, needs * 90 // 100]
    struck = set()
    for kib in levels:
        run_dir = disk / "run"
        if kib is not None:
            _leave_free(disk, kib)
        code = main(["-q", "wide", *fast_args(run_dir, shard_dir, "wide.steps=10",
                                              "eval_every=0")])
        err = capsys.readouterr().err.strip()
        assert code == EXIT_IO, (kib, err)
        assert err.startswith("gwtn: error: No space left on device: ") and "\n" not in err
        struck.add(Path(err.rsplit(": ", 1)[1]).name)
        assert _temporaries(disk) == [], kib
        if kib is None:
            monkeypatch.undo()
        else:
            (disk / "filler").unlink()  # room again: the same command continues
        assert main(["-q", "wide", *fast_args(run_dir, shard_dir, "wide.steps=10",
                                              "eval_every=0", "resume=true")]) == 0
        assert (run_dir / "wide" / "DONE").is_file() and _temporaries(disk) == []
        shutil.rmtree(run_dir)
    assert len(struck) >= (1 if small_disk is None else 3), struck
