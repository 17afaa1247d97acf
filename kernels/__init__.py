"""Triton kernels, installed as ``gwtn_dist.kernels``.

Importing this package never imports triton (the kernels load on first use), so the PyTorch
reference implementations work on machines without triton or a GPU.
"""

import sys

if __name__ == "kernels":
    # This folder is importable as the top-level ``kernels`` only while the checkout's root is on
    # sys.path: ``python -m pytest`` or ``python -c`` run here, a setuptools build of this folder.
    # That name is Hugging Face's ``kernels`` distribution, which transformers >= 5.25 requires
    # and imports, and whose setuptools plugin every build in its environment loads. Hand the
    # import over to it, so neither finds this folder in its place.
    from importlib.machinery import PathFinder
    from importlib.util import module_from_spec
    from pathlib import Path

    _checkout = Path(__file__).resolve().parent.parent
    _elsewhere = [p for p in sys.path if Path(p or ".").resolve() != _checkout]
    _spec = PathFinder.find_spec("kernels", _elsewhere)
    if _spec is None or _spec.loader is None:
        raise ModuleNotFoundError(
            "no top-level module 'kernels': this checkout's kernels/ is gwtn_dist.kernels",
            name="kernels")
    # The import statement returns what sys.modules holds once this file has run.
    _module = module_from_spec(_spec)
    sys.modules["kernels"] = _module
    _spec.loader.exec_module(_module)
else:
    from .imitation import (
        ImitationMSE,
        imitation_mse,
        imitation_mse_reference,
        select_imitation_mse,
    )

    __all__ = ["ImitationMSE", "imitation_mse", "imitation_mse_reference",
               "select_imitation_mse"]
