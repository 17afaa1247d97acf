"""``gwtn plan``: model-state bytes counted by hand, the meta trace, the teacher's placement by
the run-time rule, projected times, a refused layout's one line, and synthetic shards of the
real datasets' shapes."""

from __future__ import annotations

import csv
import io
import json
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from gwtn_dist.config import load_config
from gwtn_dist.data.synthetic import write_synthetic_images, write_synthetic_tokens
from gwtn_dist.distributed.teacher import choose_mode
from gwtn_dist.models.family import build_thin, build_wide
from gwtn_dist.plan.check import check
from gwtn_dist.plan.planner import GiB, Layout, Throughput, make_plan, read_throughput
from gwtn_dist.plan.states import Engine, partitioned, teacher_bytes, trained_states
from gwtn_dist.plan.trace import trace

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "configs" / "tiny_cpu.yaml")
META = torch.device("meta")


def engine(kind="deepspeed", zero=2, w=4, world=4, cuda=False, **kw) -> Engine:
    return Engine(kind=kind, zero=zero, weight_bytes=w, autocast=False, world=world, cuda=cuda,
                  **kw)


SIZES = [200, 20, 100, 5]  # Linear(10, 20) and Linear(20, 5): weights and biases, 325 in all


def test_model_states_counted_by_hand():
    # One process, SGD with momentum (4 bytes of state per parameter), fp32.
    s = trained_states(engine("torch", world=1), SIZES, 325, k=4, temp=0, largest_module=220)
    assert (s.params, s.grads, s.optimizer) == (1300, 1300, 1300)
    # ZeRO-2 over 4 ranks, fp32, Adam (8 bytes): whole weights, a quarter of everything else
    # (fp32 master copy 325, moments 650, gradient partition twice: bucket's reduction and fp32)
    s = trained_states(engine(zero=2), SIZES, 325, k=8, temp=0, largest_module=220)
    assert s.params == 1300
    assert s.optimizer == (4 + 8) * 325 // 4
    assert s.grads == 4 * 325 // 4 + 4 * 325 // 4
    # On a CPU the gradient bucket holds what is written, and gloo copies it to reduce it; on
    # a GPU all of it is allocated, and NCCL reduces in place.
    assert s.backward == 4 * 325 and s.reduce == 2 * 4 * 325
    s = trained_states(engine(zero=2, w=2, cuda=True, reduce_bucket=1000), SIZES, 325, k=8,
                       temp=0, largest_module=220)
    assert s.backward == s.reduce == 2 * 1000 and s.params == 2 * 325
    # ZeRO-3, persistence threshold 100: tensors under 100 elements stay whole beside their part.
    assert partitioned(SIZES, 4, 100) == 50 + (5 + 20) + 25 + (2 + 5)
    s = trained_states(engine(zero=3, persistence=100), SIZES, 325, k=4, temp=0,
                       largest_module=220)
    assert s.params == 4 * 107 and s.optimizer == 4 * 325 // 4  # fp32: master is the weights
    assert s.grads == 4 * 325 // 4 + 4 * 325  # and the zeroed buffer of the whole sub-group


def test_teacher_bytes_sharded_and_replicated():
    e = engine(zero=0, w=2, world=4, persistence=100, prefetch=50)
    assert teacher_bytes(e, SIZES, "replicate", 220, used=325) == (650, 0)
    held, running = teacher_bytes(e, SIZES, "shard", 220, used=325)
    # While it runs: every parameter live (under max_live), plus one all-gather's flat buffer
    # (prefetch bucket + the module fetched for).
    assert held == 2 * 107 and running == 2 * (325 + 270)
    # max_live bounds the live parameters, but never below the module that runs.
    e = engine(zero=0, w=2, world=4, persistence=100, prefetch=50, max_live=100)
    assert teacher_bytes(e, SIZES, "shard", 220, used=325)[1] == 2 * (220 + 270)


def test_trace_counts_new_storages_once_and_masked_selections():
    a = torch.empty(1000, device=META)
    t = trace(lambda: (a * 2) + 1)  # the product lives while the sum is made
    assert (t.peak, t.kept) == (8000, 0)
    w = torch.empty(30, 40, device=META)
    assert trace(lambda: w.t().contiguous()).peak == 4800  # the view is free, the copy is not
    x = torch.empty(4, 10, 8, device=META)
    mask = torch.empty(4, 10, dtype=torch.bool, device=META)
    assert trace(lambda: x[mask], selected=0.25).peak == 10 * 8 * 4  # a quarter of 40 rows


def params(net) -> list[int]:
    return [p.numel() for p in net.parameters()]


def tiny_plan(world: int, memory=80 * GiB, device="cuda", *overrides, **kw):
    cfg = load_config(TINY, ["data.batch_size=64", *overrides])
    return make_plan(cfg, Layout(1, world, device, memory, **kw))


def test_plan_of_the_tiny_config_matches_its_nets_counted_by_hand():
    cfg = load_config(TINY)
    wide, thin = params(build_wide(cfg.model)), params(build_thin(cfg.model))
    # One CPU process: torch engine, fp32, SGD with momentum.
    plan = tiny_plan(1, 8 * GiB, "cpu", reserve=0)
    stage = {p.name: p.terms for p in plan.phases}
    assert stage["wide"]["params"] == stage["wide"]["grads"] == 4 * sum(wide)
    assert stage["wide"]["optimizer"] == 4 * sum(wide)
    assert stage["scratch/labels"]["params"] == 4 * sum(thin)
    # Two GPUs: DeepSpeed in bf16; the wide net at ZeRO-3, whose tensors are all under the
    # persistence threshold (kept whole, plus their half).
    plan = tiny_plan(2, 80 * GiB, "cuda", "dist.wide_zero_stage=3", "dist.teacher=shard")
    w = {p.name: p for p in plan.phases}["wide"]
    assert w.terms["params"] == 2 * sum(-(-n // 2) + n for n in wide)
    assert w.terms["optimizer"] == 4 * sum(wide) // 2 + 4 * sum(wide) // 2  # master + momentum
    imitate = [p for p in plan.phases if p.stage == "imitate"]
    assert all(p.terms["teacher"] == 2 * sum(-(-n // 2) + n for n in wide) for p in imitate)
    # The imitation target of point k is the wide net's output there, (b, C, H, W) in the
    # compute dtype (bf16: the teacher runs in it): layer1 keeps 28×28 and the thin boundary
    # width (boundary_mult 1), 4 × expansion 4.
    assert imitate[0].terms["targets"] == 32 * 16 * 28 * 28 * 2


def test_the_teachers_placement_is_the_run_time_rule():
    cfg = load_config(TINY)
    teacher = 2 * sum(params(build_wide(cfg.model)))  # bf16 on GPUs
    reserve = 2 * GiB
    for free, mode in ((4 * teacher, "replicate"), (4 * teacher - 1, "shard")):
        plan = tiny_plan(2, free + reserve, "cuda")
        assert plan.teacher_mode == mode
        assert (plan.teacher_mode, plan.teacher_reason) == choose_mode("auto", teacher, free,
                                                                       0.25, 2)


def test_projected_times_follow_the_measured_throughput(tmp_path):
    csv_path = tmp_path / "bench_step.csv"
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["round", "bare_ms", "framework_ms"])
        writer.writeheader()
        writer.writerow({"round": 1, "bare_ms": 90, "framework_ms": 120})
        writer.writerow({"round": "median", "bare_ms": 80, "framework_ms": 100})
    tp = read_throughput(str(csv_path), 64)
    assert tp.samples_per_s == pytest.approx(640)
    assert read_throughput("250", 64) == Throughput(250.0, 64, "declared")
    cfg = load_config(TINY, ["data.batch_size=64"])
    plan = make_plan(cfg, Layout(1, 1, "cpu", 8 * GiB, reserve=0), throughput=tp)
    p = {p.name: p for p in plan.phases}
    assert p["scratch/labels"].step_s == pytest.approx(64 / 640)  # the measured step itself
    ratio = p["wide"].flops / p["scratch/labels"].flops
    assert p["wide"].step_s == pytest.approx(0.1 * ratio)
    assert plan.teacher_cost["stage1_thin_step_equivalents"] == round(60 * ratio)


def gwtn(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gwtn_dist", "-q", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout, check=False,
                          env={"PATH": "/usr/bin:/bin", "PYTHONWARNINGS": "ignore",
                               "DS_ACCELERATOR": "cpu"})


def test_a_layout_that_cannot_fit_is_refused_in_one_line_saying_what_to_change(tmp_path):
    # One GPU whose memory holds the wide twin's step at 32 of its 64 images, not at 64.
    eval_batch = "data.eval_batch_size=16"
    wide = {p.name: p for p in tiny_plan(1, 80 * GiB, "cuda", eval_batch).phases}["wide"]
    assert wide.peak_event == "step"
    acts = wide.events["step"]["activations"]
    memory = 2 * GiB + wide.peak - acts // 3  # the 2 GiB reserve and a third too little
    args = ["plan", TINY, "data.batch_size=64", eval_batch, "--nodes", "1",
            "--gpus-per-node", "1", "--gpu-memory", str(memory)]
    proc = gwtn(*args)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gwtn: error: plan: wide (wide) needs")
    assert "set wide.optim.accumulate=2 (micro-batch 32" in lines[0]
    changes = re.findall(r"set (\S+=\S+)", lines[0])  # every stage that does not fit
    out = tmp_path / "plan.json"
    proc = gwtn(*args[:4], *changes, *args[4:], "--json", str(out))
    assert proc.returncode == 0, proc.stderr
    assert json.loads(out.read_text())["fits"]


def test_synthetic_images_have_imagenet_shapes(tmp_path):
    index = write_synthetic_images(tmp_path, train=6, val=2, seed=1)
    assert len(index["classes"]) == 1000
    assert index["splits"]["train"]["samples"] == 6 and index["splits"]["val"]["samples"] == 2
    with tarfile.open(tmp_path / index["splits"]["train"]["shards"][0]) as tar:
        jpegs = [tar.extractfile(m).read() for m in tar.getmembers() if m.name.endswith(".jpg")]
    for data in jpegs:
        img = Image.open(io.BytesIO(data))
        assert img.format == "JPEG" and 250 <= max(img.size) <= 500 and min(img.size) >= 150
        assert 20_000 < len(data) < 400_000


def test_synthetic_tokens_have_wikipedias_shape(tmp_path):
    index = write_synthetic_tokens(tmp_path, train=20, val=3, test=3, seq_len=128)
    assert index["format"] == "tokens" and index["seq_len"] == 128
    assert {s: e["samples"] for s, e in index["splits"].items()} == {"train": 20, "val": 3,
                                                                     "test": 3}
    with tarfile.open(tmp_path / index["splits"]["train"]["shards"][0]) as tar:
        seqs = [np.load(io.BytesIO(tar.extractfile(m).read())) for m in tar.getmembers()
                if m.name.endswith(".npy")]
    ids = np.stack(seqs)
    assert ids.shape == (20, 128) and ids.dtype == np.uint16
    assert (ids[:, 0] == index["special_ids"]["[CLS]"]).all()
    assert ids.max() < 30522 and (ids == index["special_ids"]["[SEP]"]).any()


def test_a_rehearsal_runs_every_stage_on_two_ranks_and_the_plan_holds(tmp_path):
    # ImageNet's shapes (224-pixel crops of ~500-pixel JPEGs, 1000 classes) through a ResNet
    # of the ImageNet geometry cut to one narrow block per stage, so that it runs in the
    # suite: every stage in its own 2-rank launch, the teacher sharded (ZeRO-3).
    out = tmp_path / "rehearsal"
    small = ["model.blocks=[1,1,1,1]", "model.inner_widths=[4,8,8,8]", "model.stem_width=8"]
    proc = gwtn("rehearse", "configs/imagenet_resnet50.yaml", *small, "--ranks", "2",
                "--steps", "1", "--micro-batch", "1", "--out", str(out), timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads((out / "rehearsal.json").read_text())
    assert list(record["stages"]) == ["wide", "imitate", "finetune"]
    index = json.loads((out / "data" / "index.json").read_text())
    assert len(index["classes"]) == 1000 and index["format"] == "imagefolder"
    summary = json.loads((out / "run" / "summary.json").read_text())["stages"]
    assert summary["imitate"]["teacher"]["mode"] == "shard"
    assert summary["finetune"]["teacher"]["world_size"] == 2
    for stage in record["stages"].values():
        assert len(stage["peak_mb"]) == 2 and min(stage["peak_mb"]) > 200
    text, rows = check(out)
    assert len(rows) == 6 and all(r["within"] for r in rows), text
