"""The plain-torch LAMB against LAMB written out by hand in float64."""

from __future__ import annotations

import math

import pytest
import torch

from gwtn_dist.config import OptimConfig
from gwtn_dist.optim import build_optimizer
from gwtn_dist.optim.lamb import EPS, Lamb


def reference(w: list[float], grads: list[list[float]], lr: float, b1: float, b2: float,
              wd: float) -> list[float]:
    """LAMB on one parameter (a flat list), step by step, in Python floats (float64)."""
    m = [0.0] * len(w)
    v = [0.0] * len(w)
    for t, g in enumerate(grads, start=1):
        m = [b1 * mi + (1 - b1) * gi for mi, gi in zip(m, g, strict=True)]
        v = [b2 * vi + (1 - b2) * gi * gi for vi, gi in zip(v, g, strict=True)]
        u = [(mi / (1 - b1**t)) / (math.sqrt(vi / (1 - b2**t)) + EPS) + wd * wi
             for mi, vi, wi in zip(m, v, w, strict=True)]
        w_norm = math.sqrt(sum(x * x for x in w))
        u_norm = math.sqrt(sum(x * x for x in u))
        ratio = w_norm / u_norm if wd != 0 and w_norm > 0 and u_norm > 0 else 1.0
        w = [wi - lr * ratio * ui for wi, ui in zip(w, u, strict=True)]
    return w


GRADS = [[0.3, -1.2, 0.05, 2.0], [-0.7, 0.4, 0.9, -0.1], [1.5, 0.2, -0.3, 0.6]]


@pytest.mark.parametrize("steps", [1, 3])
@pytest.mark.parametrize("wd", [0.01, 0.0])
def test_plain_lamb_matches_the_hand_written_update(steps, wd):
    start = [0.5, -0.25, 1.0, 0.125]
    p = torch.nn.Parameter(torch.tensor(start, dtype=torch.float64))
    opt = Lamb([p], lr=0.02, betas=(0.9, 0.999), weight_decay=wd)
    for g in GRADS[:steps]:
        p.grad = torch.tensor(g, dtype=torch.float64)
        opt.step()
    expected = reference(start, GRADS[:steps], 0.02, 0.9, 0.999, wd)
    torch.testing.assert_close(p.detach(), torch.tensor(expected, dtype=torch.float64),
                               rtol=1e-12, atol=1e-14)


def test_trust_ratio_is_per_parameter_and_a_zero_weight_gets_ratio_one():
    """Two tensors in one group: each gets its own ||w||/||u||; a zero tensor (a fresh bias)
    moves by lr·u, as Adam would."""
    big = torch.nn.Parameter(torch.full((3,), 10.0, dtype=torch.float64))
    zero = torch.nn.Parameter(torch.zeros(3, dtype=torch.float64))
    opt = Lamb([big, zero], lr=0.1, weight_decay=0.01)
    big.grad = torch.tensor([1.0, -1.0, 1.0], dtype=torch.float64)
    zero.grad = big.grad.clone()
    opt.step()
    torch.testing.assert_close(
        big.detach(), torch.tensor(reference([10.0] * 3, [[1.0, -1.0, 1.0]], 0.1, 0.9, 0.999,
                                             0.01), dtype=torch.float64))
    # Step 1: the bias-corrected direction is sign(g) (up to eps), and ||w|| = 0 → ratio 1.
    torch.testing.assert_close(zero.detach(), -0.1 * torch.tensor([1.0, -1.0, 1.0],
                                                                  dtype=torch.float64),
                               rtol=1e-5, atol=1e-6)


def test_optim_name_lamb_builds_lamb_with_group_lr_and_decay():
    a, b = torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(2))
    o = OptimConfig(name="lamb", lr=0.004, weight_decay=0.01, betas=[0.9, 0.98])
    opt = build_optimizer([{"params": [a]}, {"params": [b], "lr_mult": 0.5,
                                            "weight_decay": 0.0}], o)
    assert isinstance(opt, Lamb)  # no apex on CPU
    assert [g["lr"] for g in opt.param_groups] == [0.004, 0.002]
    assert [g["weight_decay"] for g in opt.param_groups] == [0.01, 0.0]
    assert opt.param_groups[0]["betas"] == (0.9, 0.98)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_apex_fused_lamb_matches_the_plain_one_on_a_gpu():
    pytest.importorskip("apex.optimizers", reason="apex is not installed on this GPU machine")
    from apex.optimizers import FusedLAMB

    from gwtn_dist.optim.lamb import make_lamb

    torch.manual_seed(0)
    start = [torch.randn(64, 32, device="cuda"), torch.randn(32, device="cuda")]
    results = []
    for fused in (True, False):
        params = [torch.nn.Parameter(t.clone()) for t in start]
        groups = [{"params": params, "lr": 0.01, "weight_decay": 0.01}]
        opt = make_lamb(groups, 0.01, (0.9, 0.999)) if fused else Lamb(groups)
        assert isinstance(opt, FusedLAMB) == fused
        for step in range(3):
            gen = torch.Generator(device="cuda").manual_seed(step)
            for p in params:
                p.grad = torch.randn(p.shape, device="cuda", generator=gen)
            opt.step()
        results.append(params)
    for fused, plain in zip(*results, strict=True):
        torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-6)
