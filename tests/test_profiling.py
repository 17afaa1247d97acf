"""Where time goes: step metrics every log_every steps, the per-region breakdown, traces."""

from __future__ import annotations

import json

import pytest

from gwtn_dist.cli import main
from gwtn_dist.profiling import REGIONS
from tests.test_pipeline import fast_args


@pytest.fixture(scope="module")
def profiled_run(tmp_path_factory, shard_dir):
    """A wide stage of 20 steps and an imitation of 3 × 20, sampled every 4 steps, logged every
    10, traced over each stage's steps 3–4."""
    run_dir = tmp_path_factory.mktemp("profiled") / "run"
    args = fast_args(run_dir, shard_dir, "wide.steps=20", "imitate.steps_per_point=20",
                     "log_every=10", "profile.sample_every=4", "eval_every=0",
                     "profile.trace_start=3", "profile.trace_steps=2")
    assert main(["-q", "wide", *args]) == 0
    assert main(["-q", "imitate", *args]) == 0
    return run_dir


def test_every_log_every_steps_a_record_carries_time_memory_and_grad_norm(profiled_run):
    run_dir = profiled_run
    records = [json.loads(line) for line in
               (run_dir / "imitate" / "metrics.jsonl").read_text().splitlines()]
    timed = [r for r in records if "step_s" in r]
    assert [r["step"] for r in timed] == [10, 20] * 3  # three points of 20 steps
    for r in timed:
        assert r["step_s"] > 0 and 0 <= r["data_s"] <= r["step_s"] and r["data_cpu_s"] > 0
        assert r["samples_per_s"] > 0 and r["peak_mem_mb"] > 10 and r["grad_norm"] > 0
        assert "tokens_per_s" not in r  # images: no tokens
    assert all("step_s" not in r for r in records if r["step"] % 10)


def test_the_breakdown_covers_the_step_and_names_the_teacher_and_the_loss(profiled_run):
    run_dir = profiled_run
    phases = json.loads((run_dir / "imitate" / "stage.json").read_text())["phases"]
    for phase in phases:
        (rank0,) = phase["breakdown"]  # one rank
        assert rank0["sampled_steps"] == 5 and set(rank0["regions"]) == set(REGIONS)
        parts = sum(rank0["regions"].values())
        assert abs(parts - rank0["step_ms"]) <= 0.10 * rank0["step_ms"], rank0
        for region in ("data", "student_forward", "teacher_forward", "imitation_loss",
                       "backward", "optimizer"):
            assert rank0["regions"][region] > 0, region
    wide = json.loads((run_dir / "wide" / "stage.json").read_text())["phases"][0]
    assert wide["breakdown"][0]["regions"]["teacher_forward"] == 0  # no teacher there


def test_a_trace_is_written_for_the_asked_steps_of_each_stage(profiled_run):
    (trace,) = (profiled_run / "wide" / "trace").iterdir()
    assert trace.name == "wide-rank0.json"
    events = json.loads(trace.read_text())["traceEvents"]
    names = {e.get("name") for e in events}
    assert {"data", "student_forward", "backward", "optimizer"} <= names
    # Steps 3–4 of the imitation stage are in its first phase.
    (trace,) = (profiled_run / "imitate" / "trace").iterdir()
    assert trace.name == "imitate-layer1-rank0.json"
    names = {e.get("name") for e in json.loads(trace.read_text())["traceEvents"]}
    assert {"teacher_forward", "imitation_loss"} <= names


def test_gwtn_profile_shows_every_phase_and_draws_the_plot(profiled_run, capsys):
    assert main(["profile", str(profiled_run)]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith(("| imitate |", "| wide |"))]
    assert len(rows) == 4  # wide/train and the three imitation points, one rank
    assert "teacher forward" in out and (profiled_run / "profile.png").stat().st_size > 1000


def test_gwtn_profile_of_a_folder_without_runs_is_one_line(tmp_path, capsys):
    assert main(["profile", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("gwtn: error:") and len(err.strip().splitlines()) == 1


def _csv(path) -> list[dict]:
    import csv

    return list(csv.DictReader(path.read_text().splitlines()))


def test_gwtn_bench_step_and_imitate_print_side_by_side_ratios(tmp_path, shard_dir, capsys):
    from tests.conftest import REPO

    common = [str(REPO / "configs" / "tiny_cpu.yaml"), f"data.shards={shard_dir}",
              f"run_dir={tmp_path / 'run'}", "threads=1", "data.train_samples=0",
              "--steps", "3", "--rounds", "1", "--out", str(tmp_path / "bench")]
    assert main(["-q", "bench", "step", *common]) == 0
    first, median = _csv(tmp_path / "bench" / "bench_step.csv")
    assert median["round"] == "median" and float(first["bare_ms"]) > 0
    assert float(median["ratio"]) == pytest.approx(float(median["framework_ms"])
                                                   / float(median["bare_ms"]))
    assert float(first["framework_warmup_s"]) > 0  # the first window, reported apart
    assert float(first["data_cpu_ms"]) > 0  # the batches cost the prefetch thread CPU
    assert "| median |" in capsys.readouterr().out
    assert main(["-q", "bench", "imitate", *common]) == 0
    rows = {r["step"]: r for r in _csv(tmp_path / "bench" / "bench_imitate.csv")}
    assert {"floor", "reference", "compiled"} <= set(rows)
    assert float(rows["floor"]["ratio_to_floor"]) == 1.0


def test_the_bare_loop_leaves_a_logging_window_untimed_and_round_0_is_not_in_the_median(
        monkeypatch):
    # The framework's first window is reported apart; the bare loop must not pay its own
    # warm-up inside the timed steps either, or the ratio flatters the framework.
    import statistics

    import torch

    from gwtn_dist.benchmarks import step as step_bench

    calls, timed_from = [], []
    clock = iter(range(1000))
    monkeypatch.setattr(step_bench.time, "perf_counter", lambda: timed_from.append(len(calls))
                        or next(clock))
    assert step_bench._timed(lambda: calls.append(1), 5, torch.device("cpu"), warmup=3) == 0.2
    assert len(calls) == 8 and timed_from == [3, 8]  # 3 untimed, then 5 between the clocks
    seen, bare = [], iter([0.3, 0.1, 0.2])  # round 0's bare loop slow, as on a 2-core CPU
    monkeypatch.setattr(step_bench, "_timed", lambda step, steps, device, warmup=1:
                        seen.append(warmup) or next(bare))
    monkeypatch.setattr(step_bench, "_bare_step", lambda rt, cfg, device: None)
    monkeypatch.setattr(step_bench, "_framework_seconds",
                        lambda rt, cfg, steps, folder: (0.1, 1.0, 0.002, {}))
    monkeypatch.setattr(step_bench, "_write_csv", lambda rows, path: None)
    monkeypatch.setattr(step_bench, "resolve_device", lambda rt, cfg: torch.device("cpu"))
    from pathlib import Path

    from gwtn_dist.config import Config

    rows = step_bench.bench_step(None, Config(), steps=50, rounds=3, out=Path("unused"))
    assert seen == [10, 10, 10]  # every round leaves the framework's window untimed
    median = rows[-1]
    assert median["round"] == "median" and median["bare_ms"] == pytest.approx(150)
    assert median["ratio"] == pytest.approx(statistics.median([1.0, 0.5]))  # rounds 1, 2 only


def test_progress_in_a_log_file_is_plain_lines_not_carriage_returns(tmp_path, shard_dir):
    from tests.test_pipeline import gwtn

    args = [a for a in fast_args(tmp_path / "run", shard_dir) if a != "progress=false"]
    proc = gwtn("wide", *args, "progress=true")
    assert "\r" not in proc.stderr  # stderr is a pipe here, as in a SLURM output file
    assert "wide: step 30/30" in proc.stderr


def test_the_relative_error_needs_no_boolean_index_and_matches_one():
    import torch

    from gwtn_dist.stages.imitate import masked_variance

    torch.manual_seed(0)
    target = torch.randn(3, 7, 5, dtype=torch.float64) * 2 + 1  # (b, T, D)
    mask = torch.rand(3, 7) > 0.4  # (b, T)
    assert torch.allclose(masked_variance(target, mask), target[mask].var().float(), rtol=1e-5)
    assert torch.allclose(masked_variance(target, None), target.var().float(), rtol=1e-5)


def test_tensorboard_gets_every_metrics_record(tmp_path, shard_dir):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = tmp_path / "run"
    args = fast_args(run_dir, shard_dir, "wide.steps=20", "log_every=10", "eval_every=0",
                     "logging.tensorboard=true")
    assert main(["-q", "wide", *args]) == 0
    records = [json.loads(line) for line in
               (run_dir / "wide" / "metrics.jsonl").read_text().splitlines()]
    events = EventAccumulator(str(run_dir / "wide" / "tb"))
    events.Reload()
    loss = events.Scalars("loss")
    assert [e.step for e in loss] == [r["global_step"] for r in records] == list(range(1, 21))
    assert [e.value for e in loss] == pytest.approx([r["loss"] for r in records], rel=1e-6)
    assert [e.step for e in events.Scalars("step_s")] == [10, 20]
    assert {"lr", "grad_norm", "samples_per_s", "peak_mem_mb"} <= set(events.Tags()["scalars"])


def test_an_absent_dashboard_package_is_one_warning_and_no_sink(tmp_path, monkeypatch, caplog):
    from gwtn_dist import metric_sinks

    monkeypatch.setattr(metric_sinks, "available", lambda package: False)
    monkeypatch.setattr(metric_sinks, "_warned", set())
    with caplog.at_level("WARNING", logger="gwtn"):
        for _ in range(2):  # a second stage does not warn again
            assert metric_sinks.open_sinks(tmp_path, True, "my-project") == []
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2 and all(len(m.splitlines()) == 1 for m in lines)
    assert "logging.tensorboard" in lines[0] and "logging.wandb" in lines[1]


def test_wandb_gets_the_numeric_fields_at_the_global_step(tmp_path, monkeypatch):
    import importlib.machinery
    import sys
    import types

    from gwtn_dist import metric_sinks

    logged, inits = [], []

    class Run:
        def log(self, values, step):
            logged.append((step, values))

        def finish(self):
            logged.append("finished")

    fake = types.ModuleType("wandb")
    fake.__spec__ = importlib.machinery.ModuleSpec("wandb", None)
    fake.init = lambda **kw: inits.append(kw) or Run()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    (sink,) = metric_sinks.open_sinks(tmp_path / "run" / "wide", False, "gwtn-tests")
    sink.write({"phase": "train", "phase_index": 0, "step": 3, "global_step": 3,
                "loss": 0.5, "lr": 0.1, "loss_nonfinite": float("nan")})
    sink.close()
    assert inits[0]["project"] == "gwtn-tests" and inits[0]["name"] == "run/wide"
    assert logged == [(3, {"loss": 0.5, "lr": 0.1, "phase": "train"}), "finished"]


def _stub_wandb(monkeypatch, on_log=None) -> list[dict]:
    """A ``wandb`` module that records each ``init``'s keywords (no network, no package)."""
    import importlib.machinery
    import sys
    import types

    inits: list[dict] = []

    class Run:
        def log(self, values, step):
            if on_log is not None:
                on_log(step)

        def finish(self):
            pass

    fake = types.ModuleType("wandb")
    fake.__spec__ = importlib.machinery.ModuleSpec("wandb", None)
    fake.init = lambda **kw: inits.append(kw) or Run()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    return inits


def test_a_preempted_stage_resumes_into_the_same_wandb_run(tmp_path, shard_dir, monkeypatch):
    """Stopped on request (the run's stop file, as ``gwtn launch`` asks) after a checkpoint,
    then ``resume=true``: both starts name the same W&B run id with ``resume="allow"``, the
    id kept in the stage folder; another run folder gets another id."""
    from gwtn_dist.distributed import preempt

    run_dir = tmp_path / "run"

    def stop_after_a_checkpoint(step):
        if step == 7:  # checkpoints every 5 steps: one at step 5 is on disk
            preempt.stop_file(run_dir).touch()

    inits = _stub_wandb(monkeypatch, stop_after_a_checkpoint)
    args = fast_args(run_dir, shard_dir, "wide.steps=20", "checkpoint.every=5", "eval_every=0",
                     "logging.wandb=gwtn-tests")
    assert main(["-q", "wide", *args]) == 75
    assert main(["-q", "wide", *args, "resume=true"]) == 0
    (resume,) = json.loads((run_dir / "wide" / "stage.json").read_text())["resumes"]
    assert resume["step"] > 0  # it went on from the checkpoint, not from the start
    first, again = inits
    assert first["resume"] == again["resume"] == "allow"
    assert first["id"] == again["id"] == (run_dir / "wide" / "wandb_id").read_text().strip()

    other = tmp_path / "other"
    assert main(["-q", "wide", *fast_args(other, shard_dir, "wide.steps=2", "eval_every=0",
                                          "logging.wandb=gwtn-tests")]) == 0
    assert inits[2]["id"] != first["id"] and inits[2]["resume"] == "allow"


def test_gwtn_bench_kernels_writes_csv_and_plot_and_says_cpu_times_need_a_gpu(tmp_path, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("checks the CPU defaults")
    out = tmp_path / "kernels"
    assert main(["-q", "bench", "kernels", "--out", str(out), "--sweeps", "linear",
                 "--tokens", "64", "--reps", "1"]) == 0
    printed = capsys.readouterr().out
    assert "need a GPU" in printed and f"csv: {out / 'imitation_bench.csv'}" in printed
    rows = _csv(out / "imitation_bench.csv")
    # On CPU: eager PyTorch and the matmul floor, every mode, the quick shapes.
    assert {(r["provider"], r["mode"]) for r in rows} == {
        (p, m) for p in ("eager", "floor") for m in ("forward", "backward", "full")}
    assert {(r["d_in"], r["d_out"]) for r in rows} == {("64", "64"), ("32", "96")}
    assert all(float(r["ms"]) > 0 for r in rows)
    assert (out / "imitation_bench.png").stat().st_size > 1000


def test_gwtn_bench_kernels_bad_options_are_one_line(tmp_path, capsys):
    assert main(["bench", "kernels", "--shapes", "768by768", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("gwtn: error:") and "--shapes" in err and len(err.splitlines()) == 1



@pytest.mark.parametrize("command", ["step", "imitate"])
def test_gwtn_bench_step_and_imitate_refuse_a_family_without_images_in_one_line(
        tmp_path, capsys, command):
    from tests.conftest import REPO

    assert main(["bench", command, str(REPO / "configs" / "bert_tiny_cpu.yaml"),
                 f"data.shards={tmp_path}", "--out", str(tmp_path / "bench")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"gwtn: error: gwtn bench {command}:") and "'bert'" in err
    assert len(err.splitlines()) == 1


def _mlp_phase(steps: int, nan_at: int = 0):
    """A tiny MLP phase whose loss returns a 0-d train accuracy as a device extra (like the
    stages do), and a NaN loss at step ``nan_at`` (1-based; 0: never)."""
    import torch
    from torch import nn

    from gwtn_dist.config import OptimConfig
    from gwtn_dist.stages.loop import Phase

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))
    calls = [0]

    def loss(x, y):
        calls[0] += 1
        logits = net(x)
        value = nn.functional.cross_entropy(logits, y)
        if calls[0] == nan_at:
            value = value * float("nan")
        return value, {"train_accuracy": (logits.argmax(1) == y).float().mean(), "point": "p"}

    return Phase(name="p", steps=steps, optim=OptimConfig(lr=0.1), module=net,
                 groups=lambda: [{"params": list(net.parameters())}], loss=loss), net


def _mlp_context(stage_dir, net, log_every: int):
    import torch

    from gwtn_dist.config import DistConfig
    from gwtn_dist.distributed.runtime import Runtime
    from gwtn_dist.stages.loop import LoopContext
    from tests.test_mixed_precision import FakeBatches

    return LoopContext(stage_dir=stage_dir, modules={"net": net}, batches=FakeBatches(16),
                       device=torch.device("cpu"), micro_batch=16,
                       prepare=lambda x, y: (x, y), checkpoint_every=1000, dist=DistConfig(),
                       rt=Runtime(), progress=False, log_every=log_every)


def test_losses_reach_the_host_once_per_log_every_steps_not_every_step(tmp_path, monkeypatch):
    import torch

    from gwtn_dist.stages.loop import run_phases

    phase, net = _mlp_phase(steps=40)
    ctx = _mlp_context(tmp_path / "stage", net, log_every=20)
    waits = []  # every way a tensor's value can reach the host
    for name in ("item", "cpu", "tolist", "__float__"):
        original = getattr(torch.Tensor, name)

        def counted(self, *a, _original=original, _name=name, **kw):
            waits.append(_name)
            return _original(self, *a, **kw)

        monkeypatch.setattr(torch.Tensor, name, counted)
    run_phases(ctx, [phase])
    monkeypatch.undo()
    # Two flushes (steps 20 and 40: each a transfer and the all-reduce's copy, as lists), two
    # grad norms, and the phase-end checkpoint's copies of the 4 weights: 14. A sync per step
    # would make it 40 or more.
    assert len(waits) <= 20, waits
    records = [json.loads(line) for line in (ctx.stage_dir / "metrics.jsonl").open()]
    assert [r["step"] for r in records] == list(range(1, 41))  # still one record per step
    assert all(isinstance(r["loss"], float) and 0 <= r["train_accuracy"] <= 1
               and r["point"] == "p" for r in records)


def test_a_nan_loss_found_at_the_flush_names_its_own_step(tmp_path):
    from gwtn_dist.stages.loop import run_phases

    phase, net = _mlp_phase(steps=12, nan_at=3)
    ctx = _mlp_context(tmp_path / "stage", net, log_every=5)
    with pytest.raises(FloatingPointError, match="loss became nan at step 3;"):
        run_phases(ctx, [phase])
    steps = [json.loads(line)["step"] for line in (ctx.stage_dir / "metrics.jsonl").open()]
    assert steps == [1, 2]  # the records before it, and no checkpoint after it
    assert not (ctx.stage_dir / "checkpoint.pt").exists()
