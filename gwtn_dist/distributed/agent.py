"""torchrun on one node, ending like a gwtn command: ``python -m gwtn_dist.distributed.agent
[torchrun options] -m gwtn_dist COMMAND …`` takes torchrun's own options and runs its agent.

What differs from ``torchrun``, and why ``gwtn launch --style srun-torchrun`` starts this:

- A failed rank's own exit code is the node's (torchrun exits 1 whatever its ranks said), so
  ``gwtn launch`` and a batch script can tell a stop on request (75), a lost host
  (:data:`peers.EXIT_CODE`, 69) or a bad config (2) apart. A rank killed by a signal gives
  128 + the signal's number, with one line naming the rank, its host and the signal.
- A rendezvous that fails (its host cannot be reached within ``read_timeout``, or the other nodes
  do not join within ``join_timeout``: ``--rdzv-conf``, which ``gwtn launch`` fills from
  ``dist.rendezvous_timeout_s``) is one line naming the endpoint and the timeout, exit 69.
- torchrun's multi-line failure report (its ranks already said what went wrong, in one line
  each) is left out; ``LOGLEVEL=INFO`` brings torchrun's log back.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import sys

from . import peers


def _say(line: str) -> None:
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


def main(argv: list[str] | None = None) -> int:
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.elastic.rendezvous.api import RendezvousError
    from torch.distributed.run import parse_args, run

    args = parse_args(sys.argv[1:] if argv is None else argv)
    if "LOGLEVEL" not in os.environ:
        # torchrun logs each worker's failure as an error with a traceback's worth of lines.
        logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    host = socket.gethostname()
    try:
        run(args)
    except ChildFailedError as exc:
        rank, failure = exc.get_first_failure()
        if failure.exitcode >= 0:
            return failure.exitcode  # the rank printed its own line
        name = signal.Signals(-failure.exitcode).name
        _say(f"gwtn: error: rank {rank} on {host} was killed by {name}")
        return 128 - failure.exitcode
    except RendezvousError as exc:
        conf = f" ({args.rdzv_conf})" if args.rdzv_conf else ""
        cause = exc.__cause__ or exc
        _say(f"gwtn: error: node {host}: the rendezvous at {args.rdzv_endpoint}{conf} failed: "
             f"{type(exc).__name__}: {str(cause).splitlines()[0] if str(cause) else ''}")
        return peers.EXIT_CODE
    return 0


if __name__ == "__main__":
    sys.exit(main())
