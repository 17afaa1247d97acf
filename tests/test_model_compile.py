"""``model.compile``: every block of the thin and wide nets under torch.compile, on CPU.

torch.compile runs with the ``aot_eager`` backend here (``compiled.BACKEND``): the same graph
capture and autograd as inductor without its code generation, which takes minutes on two CPU
cores. What a user relies on: the option reaches the nets a stage trains and its teacher, the
weights and checkpoint names do not change, and training gives the eager numbers.
"""

from __future__ import annotations

import json

import pytest
import torch

from benchmarks import imitation_run
from gwtn_dist.config import load_config
from gwtn_dist.models import compiled
from gwtn_dist.models.family import build_thin
from tests.conftest import REPO

TINY = str(REPO / "configs" / "tiny_cpu.yaml")


@pytest.fixture
def aot_eager(monkeypatch):
    monkeypatch.setattr(compiled, "BACKEND", "aot_eager")
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def test_blocks_compile_in_place_with_the_same_weights_and_outputs(aot_eager):
    torch.manual_seed(0)
    net = build_thin(load_config(TINY).model).eval()
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        eager = net(x)
    names = list(net.state_dict())
    assert compiled.compile_blocks(net) is net
    assert all(compiled.is_compiled(block) for _, block in net.blocks())
    assert list(net.state_dict()) == names  # checkpoints load either way
    with torch.no_grad():
        torch.testing.assert_close(net(x), eager)


def test_imitation_stage_with_model_compile_matches_eager(aot_eager, tmp_path):
    """The imitate stage (thin net placed, teacher loaded) with model.compile=true: graphs are
    captured, and the losses equal the eager run's (fp32, reference backend)."""
    counters = torch._dynamo.utils.counters
    losses = {}
    for flag in ("false", "true"):
        counters.clear()
        out = tmp_path / flag
        imitation_run.run_one(TINY, out, "sequential", "reference", "fp32", 2,
                              ["data.batch_size=4", "threads=1", f"model.compile={flag}"])
        stage = json.loads((out / "sequential-reference" / "imitate" / "stage.json").read_text())
        assert stage["imitation_loss"]["backend"] == "reference"
        assert stage["imitation_loss"]["dtype"] == "float32"
        losses[flag] = [json.loads(line)["loss"] for line in (
            out / "sequential-reference" / "imitate" / "metrics.jsonl").read_text().splitlines()]
        graphs = counters["stats"]["unique_graphs"]
        assert (graphs > 0) == (flag == "true"), graphs
    torch.testing.assert_close(losses["true"], losses["false"], rtol=1e-5, atol=1e-6)
