"""Import this checkout's ``gwtn_dist`` (and its ``kernels/`` as ``gwtn_dist.kernels``) whether or
not the package is installed, and without DeepSpeed or webdataset where they are missing.

setup.py installs the top-level ``kernels/`` folder as ``gwtn_dist.kernels``; a checkout that is
not installed (the GPU machine gets a plain copy of the repo) has no such package until it is
loaded by path, which ``use_checkout()`` does (the same as ``tests/conftest.py``).
"""

from __future__ import annotations

import importlib.util
import sys
import types
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def use_checkout() -> None:
    """Put the checkout first on sys.path and load its ``kernels/`` as ``gwtn_dist.kernels``."""
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    import gwtn_dist

    package = Path(gwtn_dist.__file__).resolve().parent
    if package != REPO / "gwtn_dist":
        return  # another copy was imported first: leave it alone
    init = REPO / "kernels" / "__init__.py"
    found = importlib.util.find_spec("gwtn_dist.kernels")
    if found is not None and found.origin:
        origin = Path(found.origin).resolve()
        if origin == init or origin.is_relative_to(package):
            return  # this checkout's kernels, or a copy laid out as installed (the GPU check's)
    spec = importlib.util.spec_from_file_location(
        "gwtn_dist.kernels", init, submodule_search_locations=[str(init.parent)])
    module = importlib.util.module_from_spec(spec)
    sys.modules["gwtn_dist.kernels"] = module
    gwtn_dist.kernels = module
    spec.loader.exec_module(module)


def stub_if_missing(name: str) -> bool:
    """Register an empty stand-in for module ``name`` when it cannot be imported; True if so.

    gwtn_dist's data modules import webdataset at the top, although a run fed from memory
    never calls it; the stand-in lets them import, and any use of it fails with a clear error.
    """
    try:
        importlib.import_module(name)
        return False
    except ImportError:
        pass
    stub = types.ModuleType(name)

    def missing(attr: str):
        if attr.startswith("__"):  # introspection (inspect, pickle) must see a plain module
            raise AttributeError(attr)

        def fail(*args, **kwargs):
            raise RuntimeError(f"{name} is not installed here ({name}.{attr} was called); the GPU "
                               f"check feeds synthetic in-memory batches instead")
        return fail

    stub.__getattr__ = missing  # PEP 562: every attribute is a function that fails when called
    sys.modules[name] = stub
    return True


def require_cuda() -> None:
    """Exit with status 2 and one line unless a CUDA GPU and triton are usable."""
    import torch

    reason = None
    if not torch.cuda.is_available():
        reason = (f"no CUDA GPU: torch {torch.__version__} sees none "
                  f"(torch.cuda.is_available() is False)")
    elif importlib.util.find_spec("triton") is None:
        reason = "no triton: the fused imitation kernel needs the `triton` package"
    if reason:
        print(reason, file=sys.stderr)
        raise SystemExit(2)
