"""The options of ``gwtn bench kernels`` (the imitation-loss kernel benchmark,
``imitation_kernels``).

Defined apart from the benchmark, which the command imports only when it runs, so building the
CLI's parser never imports the kernels package.
"""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The benchmark's options (shared with ``gwtn bench kernels``)."""
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when present)")
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default=None,
                   help="default: bf16 on GPU, fp32 on CPU")
    p.add_argument("--quick", action="store_true",
                   help="tiny sizes and few repetitions (the default on CPU)")
    p.add_argument("--full", action="store_true", help="the full sweep even on CPU (slow)")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile provider")
    p.add_argument("--providers", default=None,
                   help="comma list of fused,eager,compile,floor (default: all; on CPU "
                        "eager,floor)")
    p.add_argument("--modes", default="forward,backward,full",
                   help="comma list of forward,backward,full")
    p.add_argument("--sweeps", default="linear,elementwise", help="comma list: linear,elementwise")
    p.add_argument("--tokens", default=None, help="comma list, e.g. 1024,8192")
    p.add_argument("--shapes", default=None, help="comma list of D_inxD_out, e.g. 768x768")
    p.add_argument("--widths", default=None, help="elementwise feature widths, comma list")
    p.add_argument("--reps", type=int, default=None, help="timed repetitions per case")
    p.add_argument("--out", default="runs/bench/kernels", help="folder for CSV and PNG "
                                                               "(default runs/bench/kernels)")
