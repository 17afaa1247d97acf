"""Mixed precision and gradient accumulation on one process (the torch engine), on CPU."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from gwtn_dist import checkpoint
from gwtn_dist.config import ConfigError, DistConfig, OptimConfig, load_config
from gwtn_dist.distributed import runtime, setup
from gwtn_dist.distributed.engines import make_engine
from gwtn_dist.stages.loop import LoopContext, Phase, micro_batches, run_phases

REPO = Path(__file__).resolve().parents[1]


def one_process(*overrides: str) -> runtime.Runtime:
    return setup.setup(load_config(None, ["device=cpu", *overrides]))


def test_auto_precision_on_cpu_is_fp32():
    rt = one_process()
    assert (rt.precision, rt.dtype, rt.autocast) == ("fp32", torch.float32, None)


def test_bf16_on_one_process_autocasts_and_keeps_fp32_weights():
    rt = one_process("dist.precision=bf16")
    assert rt.engine == "torch" and rt.dtype == torch.float32 and rt.autocast == torch.bfloat16
    net = nn.Linear(4, 3)
    with rt.autocast_context(torch.device("cpu")):
        out = net(torch.randn(2, 4))
    assert out.dtype == torch.bfloat16 and net.weight.dtype == torch.float32


def test_fp16_under_deepspeed_on_cpu_is_refused_with_the_key():
    cfg = load_config(None, ["dist.precision=fp16"])
    with pytest.raises(ConfigError, match=r"^dist\.precision: fp16 under DeepSpeed needs a CUDA"):
        runtime.resolve_precision(cfg, "deepspeed", torch.device("cpu"))


def test_lamb_under_deepspeed_needs_zero_stage_0_and_autocasts():
    cfg = load_config(None, ["wide.optim.name=lamb", "dist.precision=bf16"])
    with pytest.raises(ConfigError, match=r"^dist\.wide_zero_stage: wide\.optim is lamb"):
        runtime.precision_dtypes(cfg, "deepspeed", "bf16")
    cfg = load_config(None, ["wide.optim.name=lamb", "dist.wide_zero_stage=0"])
    assert runtime.precision_dtypes(cfg, "deepspeed", "bf16") == (torch.float32, torch.bfloat16)
    # Without LAMB, DeepSpeed trains a bf16 copy itself.
    assert runtime.precision_dtypes(load_config(None, []), "deepspeed", "bf16") == \
        (torch.bfloat16, None)


def test_fp16_on_cpu_scales_skips_inf_steps_and_resumes_the_scaler(tmp_path):
    """autocast fp16 runs on CPU in this torch; the GradScaler skips a step whose gradients
    are inf (weights unchanged, scale halved) and its state round-trips with the engine's."""
    rt = one_process("dist.precision=fp16")
    p = nn.Parameter(torch.ones(3))
    o = OptimConfig(lr=0.1, momentum=0.0, weight_decay=0.0, schedule="constant")
    engine = make_engine(rt, nn.ParameterList([p]), [{"params": [p]}], o, total_steps=4)
    assert engine.scaler is not None
    scale = engine.scaler.get_scale()
    engine.step((p * float("inf")).sum())
    assert torch.equal(p.detach(), torch.ones(3))  # skipped
    assert engine.scaler.get_scale() == scale / 2
    engine.step((p * 2).sum())
    assert torch.allclose(p.detach(), torch.full((3,), 0.8))
    saved = engine.save(tmp_path, 0, 2)
    again = make_engine(rt, nn.ParameterList([p]), [{"params": [p]}], o, total_steps=4)
    again.load(tmp_path, saved)
    assert again.scaler.get_scale() == engine.scaler.get_scale()


def test_accumulate_must_split_the_batch():
    with pytest.raises(ConfigError, match=r"^wide\.optim\.accumulate: data\.batch_size 64"):
        load_config(None, ["data.batch_size=64", "wide.optim.accumulate=3"])
    with pytest.raises(ConfigError, match=r"^imitate\.optim\.accumulate: must be > 0"):
        load_config(None, ["imitate.optim.accumulate=0"])


def test_micro_batches_split_tensors_and_token_dicts():
    x, y = torch.arange(12).view(6, 2), torch.arange(6)
    parts = micro_batches(x, y, 3)
    assert [p[1].tolist() for p in parts] == [[0, 1], [2, 3], [4, 5]]
    assert torch.equal(torch.cat([p[0] for p in parts]), x)
    tokens = {"input_ids": torch.zeros(4, 5), "attention_mask": torch.ones(4, 5)}
    (a, ya), (b, _) = micro_batches(tokens, torch.zeros(4, 5), 2)
    assert a["input_ids"].shape == b["attention_mask"].shape == ya.shape == (2, 5)


class FakeBatches:
    """Deterministic batches (b, 6) → labels (b,) by (phase, step): the stream the loop asks
    for, with the position it saves (none is needed: every batch follows from its step)."""

    per_rank = True

    def __init__(self, batch: int):
        self.batch = batch
        self.skipped: dict = {}
        self.position: dict = {}

    def seek(self, position: dict) -> None:
        pass

    def next(self, phase_index: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        gen = torch.Generator().manual_seed(1000 * phase_index + step)
        return torch.randn(self.batch, 6, generator=gen), torch.randint(0, 3, (self.batch,),
                                                                         generator=gen)


def train_mlp(tmp_path: Path, accumulate: int, steps: int = 4, batch: int = 16) -> dict:
    """An MLP without batch norm (micro-batching is exact up to rounding), SGD with momentum
    and weight decay, ``steps`` steps of ``batch`` samples in ``accumulate`` micro-batches."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))
    o = OptimConfig(lr=0.1, schedule="cosine", warmup_steps=1, accumulate=accumulate)
    phase = Phase(name="p", steps=steps, optim=o, module=net,
                  groups=lambda: [{"params": list(net.parameters())}],
                  loss=lambda x, y: (nn.functional.cross_entropy(net(x), y), {}))
    ctx = LoopContext(stage_dir=tmp_path / f"acc{accumulate}", modules={"net": net},
                      batches=FakeBatches(batch), device=torch.device("cpu"), micro_batch=batch,
                      prepare=lambda x, y: (x, y), checkpoint_every=100, dist=DistConfig(),
                      rt=runtime.Runtime(), progress=False, log_every=1)
    run_phases(ctx, [phase])
    losses = [json.loads(line)["loss"]
              for line in (ctx.stage_dir / "metrics.jsonl").read_text().splitlines()]
    return {"state": {k: v.clone() for k, v in net.state_dict().items()}, "losses": losses}


def test_accumulating_two_micro_batches_gives_the_weights_of_the_whole_batch(tmp_path):
    whole, halves = train_mlp(tmp_path, 1), train_mlp(tmp_path, 2)
    for name, tensor in whole["state"].items():
        torch.testing.assert_close(halves["state"][name], tensor, rtol=1e-5, atol=1e-6)
    assert halves["losses"] == pytest.approx(whole["losses"], rel=1e-5)
    assert whole["state"]["0.weight"].dtype == torch.float32


def test_a_short_bf16_run_on_one_process_trains_with_fp32_weights(tmp_path, shard_dir):
    """``gwtn wide`` on one process with dist.precision=bf16 and accumulate 2: the forward
    runs under bf16 autocast, the losses stay finite and fall, model.pt holds fp32 weights."""
    run_dir = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "gwtn_dist", "-q", "wide", str(REPO / "configs" / "tiny_cpu.yaml"),
         f"run_dir={run_dir}", f"data.shards={shard_dir}", "progress=false", "threads=2",
         "eval_every=0", "data.train_samples=0", "wide.steps=12", "dist.precision=bf16",
         "wide.optim.accumulate=2", "log_every=4"],
        capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads(line) for line in
               (run_dir / "wide" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records]
    assert len(losses) == 12 and all(math.isfinite(v) for v in losses)
    assert sum(losses[-4:]) < sum(losses[:4])
    state = checkpoint.load(run_dir / "wide" / "model.pt")["state_dict"]
    assert all(v.dtype == torch.float32 for v in state.values() if v.is_floating_point())
