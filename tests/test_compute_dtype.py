"""The imitation loss gets the thin net's features and the teacher's targets in the compute
dtype (bf16 under autocast), not float32 copies, with either backend, and stage.json says which
backend and dtype ran. On CPU: autocast bf16, the reference and the Triton kernels (interpreter).
"""

from __future__ import annotations

import json

import pytest
import torch

from benchmarks import imitation_run
from gwtn_dist.stages import imitate
from tests.conftest import REPO

TINY = str(REPO / "configs" / "tiny_cpu.yaml")


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_imitation_loss_reads_bf16_features_and_records_it(backend, tmp_path, monkeypatch):
    seen = []
    select = imitate.select_imitation_mse

    def spying_select(name, device):
        fn = select(name, device)

        def loss(x, target, *args, **kwargs):
            seen.append((x.dtype, target.dtype))
            return fn(x, target, *args, **kwargs)
        loss.__wrapped__ = fn
        return loss

    monkeypatch.setattr(imitate, "select_imitation_mse", spying_select)
    monkeypatch.setattr(imitate, "describe_run",  # the record names the function that ran
                        lambda fn, dtype, real=imitate.describe_run: real(fn.__wrapped__, dtype))
    imitation_run.run_one(TINY, tmp_path, "sequential", backend, "bf16", 2,
                          ["data.batch_size=4", "threads=1"])
    assert seen and set(seen) == {(torch.bfloat16, torch.bfloat16)}, set(seen)
    stage = json.loads((tmp_path / f"sequential-{backend}" / "imitate" / "stage.json").read_text())
    record = stage["imitation_loss"]
    assert (record["backend"], record["dtype"]) == (backend, "bfloat16")
    assert record.get("tiles") == ("autotuned" if backend == "triton" else None)
    assert record["notes"] == [] and stage["final_loss"] == stage["final_loss"]  # not NaN
