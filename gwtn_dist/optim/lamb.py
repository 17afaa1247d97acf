"""LAMB (You et al., 2019, "Large Batch Optimization for Deep Learning"): Adam with a per-layer
trust ratio, for large batches.

``Lamb`` is the plain-torch reference and runs anywhere; ``make_lamb`` picks apex's
``FusedLAMB`` (one multi-tensor kernel for all parameters) when apex is installed with its
CUDA extensions and the parameters are on a GPU. Both compute, for every parameter w with
gradient g at step t (per group: lr, betas (b1, b2), eps, weight_decay wd):

    m = b1·m + (1 − b1)·g,   v = b2·v + (1 − b2)·g²
    u = (m / (1 − b1^t)) / (sqrt(v / (1 − b2^t)) + eps) + wd·w      (decoupled decay)
    r = ||w|| / ||u||   if wd ≠ 0 and both norms are > 0, else 1     (NVIDIA's rule)
    w = w − lr·r·u

NVIDIA's rule leaves the trust ratio out of groups without weight decay (apex's default,
``use_nvlamb=False``), and falls back to 1 where a norm is zero (a zero-initialised bias, or
a zero update); it does not clamp r otherwise (DeepSpeed's own FusedLamb clamps it to
[0.01, 10], which we do not use). Global gradient clipping is the engine's (``grad_clip``),
so apex's own clipping is switched off.
"""

from __future__ import annotations

import logging

import torch

log = logging.getLogger("gwtn")

EPS = 1e-6  # NVIDIA's BERT recipe (apex's default); Adam's 1e-8 is AdamW's here


class Lamb(torch.optim.Optimizer):
    """Plain-torch LAMB with bias correction and decoupled weight decay (module docstring)."""

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = EPS, weight_decay: float = 0.01):
        super().__init__(params, {"lr": lr, "betas": tuple(betas), "eps": eps,
                                  "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self, closure=None):
        """One LAMB update of every parameter that has a gradient."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            b1, b2 = group["betas"]
            lr, eps, wd = group["lr"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p,
                                                           memory_format=torch.preserve_format)
                state["step"] += 1
                t = state["step"]
                m, v, g = state["exp_avg"], state["exp_avg_sq"], p.grad
                m.mul_(b1).add_(g, alpha=1 - b1)
                v.mul_(b2).addcmul_(g, g, value=1 - b2)
                # The bias-corrected Adam direction plus decoupled decay, p's shape.
                update = (m / (1 - b1**t)) / ((v / (1 - b2**t)).sqrt_().add_(eps))
                if wd != 0:
                    update.add_(p, alpha=wd)
                    # 0-d tensors: no host sync per parameter.
                    w_norm = torch.linalg.vector_norm(p)
                    u_norm = torch.linalg.vector_norm(update)
                    ratio = torch.where((w_norm > 0) & (u_norm > 0), w_norm / u_norm,
                                        torch.ones_like(w_norm))
                    update.mul_(ratio)
                p.add_(update, alpha=-lr)
        return loss


_apex_warned = False


def make_lamb(groups: list[dict], lr: float, betas: tuple[float, float]) -> torch.optim.Optimizer:
    """apex's FusedLAMB when it is installed (with CUDA extensions) and every parameter is an
    fp32 CUDA tensor; else the plain ``Lamb``. Groups carry their own lr and weight_decay."""
    global _apex_warned
    params = [p for g in groups for p in g["params"]]
    if all(p.is_cuda and p.dtype == torch.float32 for p in params):
        try:
            from apex.optimizers import FusedLAMB

            # max_grad_norm=inf: apex divides by it when the global norm exceeds it, so 0
            # would zero every gradient; clipping is the engine's.
            return FusedLAMB(groups, lr=lr, betas=tuple(betas), eps=EPS, weight_decay=0.0,
                             max_grad_norm=float("inf"), use_nvlamb=False)
        except (ImportError, RuntimeError) as exc:  # no apex, or apex without its CUDA ops
            if not _apex_warned:
                log.info("LAMB: apex's FusedLAMB unavailable (%s); using the plain-torch LAMB",
                         exc)
                _apex_warned = True
    return Lamb(groups, lr=lr, betas=betas, eps=EPS, weight_decay=0.0)
