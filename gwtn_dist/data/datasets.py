"""What each ``data.dataset`` value means to the rest of the code.

``ensure_shards``: Fashion-MNIST's shards are written on first use from Debian's package.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from ..config import Config
from .fashion_mnist import write_fashion_mnist

log = logging.getLogger("gwtn")


def ensure_shards(cfg: Config, is_main: bool, wait_s: float = 600.0) -> None:
    """Write the Fashion-MNIST shards from Debian's package if the config's folder has none.

    Only the main rank (``is_main``) writes; the caller holds the other ranks at a barrier until
    it is done. A process that finds another writing them (e.g. a second compare worker) waits
    up to ``wait_s`` for it first.
    """
    from ..workers import FileLock

    shards = Path(cfg.data.shards)
    if cfg.data.dataset == "fashion-mnist" and is_main:
        deadline = time.monotonic() + wait_s
        while FileLock(shards / ".lock").busy() and time.monotonic() < deadline:
            time.sleep(1.0)
        if not (shards / "index.json").is_file():
            log.info("no shards in %s yet: writing them from the installed Fashion-MNIST", shards)
            write_fashion_mnist(shards, None, progress=cfg.progress)
