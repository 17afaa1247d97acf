"""The three stages end to end: outputs, baselines, exact resume after a kill, CLI errors."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from gwtn_dist.cli import main
from tests.conftest import REPO

# A run that takes seconds on the fixture data: 3 stages of 1 block, a handful of steps each.
FAST = [
    "progress=false", "threads=2", "eval_every=10", "eval_samples=100",
    "model.blocks=[1,1,1]", "model.inner_widths=[4,4,8]", "model.stem_width=8",
    "data.batch_size=32", "data.shuffle_buffer=200", "wide.steps=30",
    "imitate.steps_per_point=12", "finetune.kd_steps=6", "finetune.label_steps=16",
    "checkpoint.every=5",
]


def gwtn(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    """Run the installed CLI as a user would (``python -m gwtn_dist``)."""
    proc = subprocess.run([sys.executable, "-m", "gwtn_dist", *args], cwd=REPO, check=False,
                          capture_output=True, text=True, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"gwtn {' '.join(args)} failed:\n{proc.stderr[-3000:]}")
    return proc


def fast_args(run_dir: Path, shard_dir: Path, *extra: str) -> list[str]:
    return [str(REPO / "configs/tiny_cpu.yaml"), f"run_dir={run_dir}",
            f"data.shards={shard_dir}", "data.train_samples=0", *FAST, *extra]


def test_run_writes_every_stage_and_the_baseline(tmp_path, shard_dir):
    run_dir = tmp_path / "run"
    assert main(["-q", "run", *fast_args(run_dir, shard_dir)]) == 0
    summary = json.loads((run_dir / "summary.json").read_text())
    assert set(summary["stages"]) == {"wide", "imitate", "finetune", "scratch"}
    for stage, rec in summary["stages"].items():
        assert (run_dir / stage / "DONE").is_file()
        assert (run_dir / stage / "model.pt").is_file()
        assert rec["steps"] > 0 and rec["wall_s"] > 0 and rec["final_loss"] > 0
        assert 0.0 <= rec["test_accuracy"] <= 1.0 and rec["test_samples"] == 300
        lines = (run_dir / stage / "metrics.jsonl").read_text().splitlines()
        assert len(lines) == rec["steps"]
    s = summary["stages"]
    assert s["imitate"]["steps"] == 3 * 12 and s["finetune"]["steps"] == 22
    assert s["scratch"]["steps"] == 3 * 12 + 22  # the same thin-net budget as the method
    assert s["imitate"]["points"] == ["layer1", "layer2", "layer3"]
    # Chance is 0.1: the wide net and the method's thin net learn the fixture.
    assert s["wide"]["test_accuracy"] > 0.25
    assert s["finetune"]["test_accuracy"] > 0.2
    assert (run_dir / "config.yaml").is_file()
    # Each imitation phase lowers its own loss (the MSE to the wide net at that point).
    recs = [json.loads(line) for line in (run_dir / "imitate" / "metrics.jsonl").open()]
    for point in ("layer1", "layer2", "layer3"):
        losses = [r["loss"] for r in recs if r["point"] == point]
        assert sum(losses[-4:]) < sum(losses[:4]), point
    # The checkpoint of a finished stage points past its last phase.
    ckpt = torch.load(run_dir / "finetune" / "checkpoint.pt", weights_only=False)
    assert ckpt["phase_index"] == 2 and ckpt["step"] == 0


def test_boundary_widening_runs_and_merges_back_to_the_thin_shape(tmp_path, shard_dir):
    run_dir = tmp_path / "run"
    assert main(["-q", "run", *fast_args(run_dir, shard_dir, "model.widen.boundary_mult=2",
                                         "imitate.target_norm=layernorm", "arms=[win]")]) == 0
    from gwtn_dist.config import load_config
    from gwtn_dist.models.family import build_thin

    thin = build_thin(load_config(run_dir / "config.yaml").model)
    blob = torch.load(run_dir / "imitate" / "model.pt", weights_only=False)
    assert {k: v.shape for k, v in blob["state_dict"].items()} == \
        {k: v.shape for k, v in thin.state_dict().items()}
    assert json.loads((run_dir / "imitate" / "stage.json").read_text())["bridges"] is True


def _weights(path: Path) -> dict:
    return torch.load(path, weights_only=False)["state_dict"]


def test_killed_run_resumes_to_the_same_weights(tmp_path, shard_dir):
    # Uninterrupted reference run.
    ref = tmp_path / "ref"
    gwtn("run", *fast_args(ref, shard_dir, "arms=[win]"))
    # Same run, killed with SIGKILL once imitation has written a mid-phase checkpoint.
    run_dir = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "gwtn_dist", "run",
                             *fast_args(run_dir, shard_dir, "arms=[win]")],
                            cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt = run_dir / "imitate" / "checkpoint.pt"
    deadline = time.time() + 300
    while not ckpt.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (run_dir / "finetune" / "DONE").exists(), "the run finished before the kill"
    killed_at = torch.load(ckpt, weights_only=True)  # where the resume must pick up
    finished = {p.name: (p.read_bytes(), p.stat().st_mtime_ns)
                for p in (run_dir / "wide").iterdir() if p.is_file()}
    again = gwtn("run", *fast_args(run_dir, shard_dir, "arms=[win]"), check=False)
    assert again.returncode == 2 and "resume=true" in again.stderr
    gwtn("run", *fast_args(run_dir, shard_dir, "arms=[win]", "resume=true"))
    # The finished wide stage was left alone (same bytes, same mtime) ...
    assert {p.name: (p.read_bytes(), p.stat().st_mtime_ns)
            for p in (run_dir / "wide").iterdir() if p.is_file()} == finished
    # ... and imitation continued from its checkpoint instead of starting over.
    (resume,) = json.loads((run_dir / "imitate" / "stage.json").read_text())["resumes"]
    assert (resume["phase_index"], resume["step"]) == (killed_at["phase_index"],
                                                      killed_at["step"])
    assert resume["phase_index"] > 0 or resume["step"] >= 1
    assert json.loads((run_dir / "finetune" / "stage.json").read_text())["resumes"] == []
    for stage in ("wide", "imitate", "finetune"):
        a, b = _weights(ref / stage / "model.pt"), _weights(run_dir / stage / "model.pt")
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), f"{stage}: {k} differs after resume"
    lines = (run_dir / "imitate" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 36  # no step logged twice


def test_resume_with_a_changed_config_names_the_keys(tmp_path, shard_dir):
    run_dir = tmp_path / "run"
    assert main(["-q", "wide", *fast_args(run_dir, shard_dir)]) == 0
    saved = (run_dir / "config.yaml").read_bytes()
    proc = gwtn("run", *fast_args(run_dir, shard_dir, "resume=true", "wide.steps=31"),
                check=False)
    assert proc.returncode == 2
    assert "wide.steps (30 → 31)" in proc.stderr
    refusal = proc.stderr.split(":")[:3]
    # A stage command continues the run without resume=true, but not under another config:
    # the same guard, the same one-line refusal, and the saved config left as it was.
    proc = gwtn("imitate", *fast_args(run_dir, shard_dir, "imitate.steps_per_point=13"),
                check=False)
    assert proc.returncode == 2 and "imitate.steps_per_point (12 → 13)" in proc.stderr
    assert refusal[2].startswith(" resume=true but the config differs from the one ")
    # resume=true was not given here, so the line does not say it was.
    assert proc.stderr.split(":")[:3] == [*refusal[:2], refusal[2].replace(" resume=true but", "")]
    assert len(proc.stderr.splitlines()) == 1
    assert not (run_dir / "imitate").exists()
    assert (run_dir / "config.yaml").read_bytes() == saved
    assert not list(run_dir.glob("*/config.yaml"))  # one saved config per run, no stage's own
    # A run folder moved elsewhere resumes there: run_dir is not a key that changes the run.
    moved = tmp_path / "moved"
    run_dir.rename(moved)
    assert main(["-q", "wide", *fast_args(moved, shard_dir, "resume=true")]) == 0


def test_a_run_folder_in_use_is_refused_naming_the_holder(tmp_path, shard_dir):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    holder = subprocess.Popen(["sleep", "60"])
    try:
        (run_dir / ".lock").write_text(json.dumps({"host": socket.gethostname(),
                                                   "pid": holder.pid}))
        proc = gwtn("wide", *fast_args(run_dir, shard_dir), check=False)
        assert proc.returncode == 2 and f"in use by process {holder.pid}" in proc.stderr
    finally:
        holder.kill()
        holder.wait()
    # The holder is gone: its lock is stale and taken over.
    proc = gwtn("wide", *fast_args(run_dir, shard_dir, "wide.steps=3"), check=False)
    assert proc.returncode == 0 and "stale lock" in proc.stderr
    assert not (run_dir / ".lock").exists()


def test_stage_commands_hand_off_by_path_and_check_order(tmp_path, shard_dir):
    run_dir = tmp_path / "run"
    proc = gwtn("imitate", *fast_args(run_dir, shard_dir), check=False)
    assert proc.returncode == 2 and "run `gwtn wide` first" in proc.stderr
    for stage in ("wide", "imitate", "finetune"):
        out = gwtn(stage, *fast_args(run_dir, shard_dir)).stdout
        assert f"{stage}: test accuracy" in out
        assert (run_dir / stage / "DONE").is_file()
    # A stage that never reads the test split reports its validation score.
    other = tmp_path / "val-only"
    out = gwtn("wide", *fast_args(other, shard_dir, "eval_test=false", "wide.steps=3")).stdout
    assert "wide: val accuracy" in out


def test_cli_reports_bad_input_without_a_traceback(tmp_path, shard_dir):
    proc = gwtn("run", *fast_args(tmp_path / "r", shard_dir, "imitate.nope=1"), check=False)
    assert proc.returncode == 2
    assert "unknown key imitate.nope" in proc.stderr and "Traceback" not in proc.stderr
    proc = gwtn("shards", "fashion-mnist", str(tmp_path / "s"), "--src", str(tmp_path / "none"),
                check=False)
    assert proc.returncode == 2 and "dataset-fashion-mnist" in proc.stderr


def test_shards_command_writes_the_index(tmp_path, idx_dir):
    out = tmp_path / "shards"
    proc = gwtn("shards", "fashion-mnist", str(out), "--src", str(idx_dir))
    assert "train: 1200 samples" in proc.stdout
    index = json.loads((out / "index.json").read_text())
    assert index["splits"]["test"]["samples"] == 300


def test_compare_writes_table_json_and_plot(tmp_path, shard_dir):
    run_dir = tmp_path / "cmp"
    assert main(["-q", "compare", *fast_args(run_dir, shard_dir, "compare.seeds=[0,1]",
                                             "arms=[scratch,kd,win,deeper]",
                                             "compare.deeper_blocks=[2,2,2]",
                                             "compare.share_teacher=true")]) == 0
    out = run_dir / "compare"
    table = json.loads((out / "compare.json").read_text())
    assert list(table["arms"]) == ["scratch", "kd", "win", "deeper"]
    for row in table["arms"].values():
        assert set(row["per_seed"]) == {"0", "1"}
        assert row["steps"] == table["budget_steps"] == 3 * 12 + 22
    md = (out / "compare.md").read_text()
    assert "thin, Go Wide Then Narrow" in md and "deeper thin from scratch" in md
    assert (out / "compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # One shared teacher, not one per seed.
    assert (out / "shared" / "wide" / "DONE").is_file()
    assert not (out / "seed1" / "wide").exists()


@pytest.mark.slow_data
def test_tiny_cpu_config_on_real_fashion_mnist(tmp_path, real_shard_dir):
    run_dir = tmp_path / "tiny"
    gwtn("run", str(REPO / "configs/tiny_cpu.yaml"), f"run_dir={run_dir}",
         f"data.shards={real_shard_dir}", "progress=false")
    summary = json.loads((run_dir / "summary.json").read_text())
    assert set(summary["stages"]) == {"wide", "imitate", "finetune", "scratch"}
    # Real learning on real data: far above the 10% of chance after a few dozen steps.
    assert summary["stages"]["wide"]["test_accuracy"] > 0.4
    assert summary["stages"]["finetune"]["test_accuracy"] > 0.3
    assert summary["stages"]["finetune"]["test_samples"] == 10_000


def test_a_run_started_before_a_key_existed_resumes_while_the_key_keeps_its_default(tmp_path):
    """Upgrading gwtn_dist adds config keys; a run saved without them resumes as long as they
    keep their defaults (they cannot have changed what the run computed), not otherwise."""
    import yaml

    from gwtn_dist.config import ConfigError, load_config
    from gwtn_dist.distributed.runtime import Runtime
    from gwtn_dist.pipeline import prepare_run_dir, release_locks

    run_dir = tmp_path / "run"
    cfg = load_config(str(REPO / "configs/tiny_cpu.yaml"), [f"run_dir={run_dir}"])
    prepare_run_dir(Runtime(), cfg, run_dir)
    release_locks()
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    del saved["log_every"], saved["dist"]["tf32"], saved["wide"]["optim"]["accumulate"]
    (run_dir / "config.yaml").write_text(yaml.safe_dump(saved))
    resumed = load_config(str(REPO / "configs/tiny_cpu.yaml"), [f"run_dir={run_dir}",
                                                                 "resume=true"])
    prepare_run_dir(Runtime(), resumed, run_dir)
    release_locks()
    (run_dir / "config.yaml").write_text(yaml.safe_dump(saved))
    changed = load_config(str(REPO / "configs/tiny_cpu.yaml"),
                          [f"run_dir={run_dir}", "resume=true", "wide.optim.accumulate=2"])
    with pytest.raises(ConfigError, match=r"wide.optim.accumulate \(1 → 2\)"):
        prepare_run_dir(Runtime(), changed, run_dir)
    release_locks()


def test_parallel_imitation_runs_all_stages_within_the_sequential_budget(tmp_path, shard_dir):
    run_dir = tmp_path / "run"
    # Boundary widening: the upper segments start from Q · (the teacher's output below).
    assert main(["-q", "run", *fast_args(run_dir, shard_dir, "imitate.schedule=parallel",
                                         "imitate.parallel_polish_steps=4",
                                         "model.widen.boundary_mult=2")]) == 0
    s = json.loads((run_dir / "summary.json").read_text())["stages"]
    imit = s["imitate"]
    # 3 points × 12 steps, as sequential: 3 × (12 − 4) parallel steps, then 4 per point.
    assert imit["steps"] == 3 * 12 and s["scratch"]["steps"] == 3 * 12 + 22
    assert imit["settings"]["schedule"] == "parallel" and imit["bridges"] is True
    assert set(imit["relative_error"]) == {"layer1", "layer2", "layer3"}
    assert 0 <= imit["test_accuracy"] <= 1 and s["finetune"]["test_accuracy"] > 0.2
    recs = [json.loads(line) for line in (run_dir / "imitate" / "metrics.jsonl").open()]
    assert [r["phase"] for r in recs] == ["imitate/parallel"] * 24 + [
        f"imitate/polish/{p}" for p in ("layer1", "layer2", "layer3") for _ in range(4)]
    par = [r for r in recs if r["point"] == "parallel"]
    # Every point is measured at every parallel step, and each point's error falls.
    for point in ("layer1", "layer2", "layer3"):
        errors = [r[f"rel_error/{point}"] for r in par]
        assert sum(errors[-4:]) < sum(errors[:4]), point
    assert sum(r["loss"] for r in par[-4:]) < sum(r["loss"] for r in par[:4])


def test_a_crash_mid_parallel_imitation_resumes_to_the_same_weights(tmp_path, shard_dir,
                                                                    monkeypatch):
    from gwtn_dist.stages import loop

    args = ["imitate.schedule=parallel", "imitate.steps_per_point=6",
            "imitate.parallel_polish_steps=2", "wide.steps=10"]
    ref, crashed = tmp_path / "ref", tmp_path / "crashed"
    assert main(["-q", "wide", *fast_args(ref, shard_dir, *args)]) == 0
    (crashed / "wide").mkdir(parents=True)
    for p in (ref / "wide").iterdir():
        if p.is_file():
            (crashed / "wide" / p.name).write_bytes(p.read_bytes())
    assert main(["-q", "imitate", *fast_args(ref, shard_dir, *args)]) == 0
    write, calls = loop.MetricsLog.write, []

    def crash_at_step_8(self, record):  # the parallel phase runs 12 steps, saved every 5
        calls.append(record)
        if len(calls) == 8:
            raise RuntimeError("simulated crash")
        write(self, record)

    monkeypatch.setattr(loop.MetricsLog, "write", crash_at_step_8)
    with pytest.raises(RuntimeError, match="simulated crash"):
        main(["-q", "imitate", *fast_args(crashed, shard_dir, *args)])
    monkeypatch.undo()
    assert main(["-q", "imitate", *fast_args(crashed, shard_dir, *args)]) == 0
    (resume,) = json.loads((crashed / "imitate" / "stage.json").read_text())["resumes"]
    assert (resume["phase"], resume["step"]) == ("imitate/parallel", 5)
    a, b = _weights(ref / "imitate" / "model.pt"), _weights(crashed / "imitate" / "model.pt")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert len((crashed / "imitate" / "metrics.jsonl").read_text().splitlines()) == 18
