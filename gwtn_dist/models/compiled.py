"""``model.compile``: the nets' blocks under ``torch.compile``.

Each block of ``net.blocks()`` is compiled in place (``nn.Module.compile``), not the net as a
whole: the stages run blocks one at a time (a prefix up to an imitation point, a teacher-fed
segment, the whole trunk), which a compiled top-level forward would not cover, and an in-place
compile keeps the modules, their parameter names and so the checkpoints exactly as they are.
The head (pooling and classifier, or the masked-LM decoder) stays eager. Blocks of one kind and
shape share a compiled graph; each new input shape (an imitation point's width, the last
partial batch) compiles once more.
"""

from __future__ import annotations

import logging

from torch import nn

log = logging.getLogger("gwtn")

# torch.compile's backend. The tests set "aot_eager" (the same graph capture and autograd, no
# code generation, which takes minutes on two CPU cores).
BACKEND = "inductor"


def compile_blocks(net: nn.Module) -> nn.Module:
    """Compile every block of ``net`` (a family's net, with ``blocks()``) in place; returns it."""
    blocks = net.blocks()
    for _, block in blocks:
        block.compile(backend=BACKEND)
    log.info("model.compile: %d blocks of %s under torch.compile (%s)", len(blocks),
             type(net).__name__, BACKEND)
    return net


def is_compiled(module: nn.Module) -> bool:
    """Whether ``module`` was compiled in place (``nn.Module.compile``)."""
    return getattr(module, "_compiled_call_impl", None) is not None
