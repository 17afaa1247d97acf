"""Stop cleanly when the scheduler asks: checkpoint at a step every rank agrees on, then exit.

SLURM warns a job before its time limit (or a preemption) with a signal, ``#SBATCH
--signal=[B:]USR1@SECONDS``. A rank learns of the request in one of two ways:

- the signal itself (``GWTN_PREEMPT_SIGNAL``, default ``USR1``), when SLURM sends it to every task
  of the job step (``--signal=USR1@N``, ranks started by plain ``srun``);
- a file named ``PREEMPT`` in the run directory. ``gwtn launch`` writes it when the batch shell gets
  the signal (``--signal=B:USR1@N``): launchers between the batch shell and the ranks (torchrun,
  the deepspeed launcher) would die of a signal they do not handle, and a file on the shared run
  directory reaches every node. ``touch RUN_DIR/PREEMPT`` stops a run by hand the same way.

Ctrl-C (SIGINT) and SIGTERM (what a scheduler sends before SIGKILL, what ``kill`` sends) are a
stop request too, handled the same way: the run checkpoints at the next step boundary and exits
with :data:`EXIT_CODE`. A second SIGINT or SIGTERM while a stop is pending stops at once, without
a checkpoint (the previous one stays): :class:`Interrupted`, exit 128 + the signal's number (130
for Ctrl-C, 143 for SIGTERM), still one line.

The training loop reads :func:`asked_here` once per step on every rank and sums the answers in the
all-reduce that averages the step's loss (no collective of its own), so all ranks stop after the
same step and :func:`acknowledge` the request. The loop then writes its
checkpoint and raises :class:`Preempted`; the CLI exits with :data:`EXIT_CODE`, and
``resume=true`` continues from that step.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from pathlib import Path

import torch

from .env import LaunchError
from .runtime import Runtime, all_reduce_sum

EXIT_CODE = 75  # EX_TEMPFAIL: "try again later", which is what a requeued job does
SIGNAL_VARIABLE = "GWTN_PREEMPT_SIGNAL"
# Signals that ask for a stop with a checkpoint the first time and stop at once the second.
INTERRUPTS = (signal.SIGINT, signal.SIGTERM)


class Preempted(Exception):
    """A stop was requested; the stage checkpointed at ``step`` of its phase ``phase``."""

    def __init__(self, stage_dir: Path, phase: str, step: int):
        super().__init__(f"stopped on request after step {step} of {phase} and checkpointed "
                         f"{stage_dir / 'checkpoint.pt'}; run again with resume=true to continue")
        self.stage_dir, self.phase, self.step = stage_dir, phase, step


class Interrupted(KeyboardInterrupt):
    """A second SIGINT/SIGTERM (or one outside training): stop at once, without a checkpoint.
    A KeyboardInterrupt, so that no ``except Exception`` swallows it and code that expects
    Ctrl-C (a DataLoader worker, which inherits the handlers) treats it as one."""

    def __init__(self, signum: int, pending: bool = True):
        name = signal.Signals(signum).name
        super().__init__(
            f"{name} again: stopped at once, without a checkpoint; resume=true continues from "
            f"the last one" if pending else f"{name}: stopped")
        self.signum = signum

    @property
    def exit_code(self) -> int:
        """128 + the signal's number, as a shell reports a process ended by it."""
        return 128 + self.signum


log = logging.getLogger("gwtn")
_run_dir: Path | None = None
_is_main = True  # whether this process removes a consumed stop file (rank 0 does)
_signalled = False
_started = 0.0
_saved: dict[int, object] = {}  # each signal's handler before this module set one
# A stop file older than this process (by more than the clock skew between nodes allowed here)
# was left by an earlier run: it does not stop this one.
STALE_SLACK_S = 5.0


def stop_file(run_dir: Path) -> Path:
    """The file whose existence asks every rank of a run to checkpoint and stop."""
    return Path(run_dir) / "PREEMPT"


def signal_number(name: str | None = None) -> signal.Signals:
    """``"USR1"``, ``"SIGUSR1"`` or ``"10"`` → the signal (default: ``GWTN_PREEMPT_SIGNAL`` or
    USR1); a LaunchError for a name that is no signal, or one a process cannot catch."""
    given = name or os.environ.get(SIGNAL_VARIABLE) or "USR1"
    text = given.upper()
    try:
        sig = signal.Signals(int(text)) if text.isdigit() else \
            signal.Signals[text if text.startswith("SIG") else "SIG" + text]
    except (KeyError, ValueError):
        raise LaunchError(f"stop signal {given!r} (--signal or {SIGNAL_VARIABLE}) is not a "
                          f"signal; give a name such as USR1 or a number") from None
    if sig in (signal.SIGKILL, signal.SIGSTOP):
        raise LaunchError(f"stop signal {given!r}: {sig.name} cannot be caught, so it cannot "
                          f"ask for a checkpoint; use USR1 (or another catchable signal)")
    return sig


def _on_signal(signum, frame) -> None:
    global _signalled
    if _signalled and signum in INTERRUPTS:
        raise Interrupted(signum)
    _signalled = True
    if signum in INTERRUPTS and _is_main:
        log.info("%s: checkpointing after this step, then stopping (again: stop at once, "
                 "without a checkpoint)", signal.Signals(signum).name)


def _on_signal_outside_training(signum, frame) -> None:
    raise Interrupted(signum, pending=False)


def handle(sig: int, handler) -> None:
    """``signal.signal(sig, handler)``, the handler before it kept for :func:`restore`."""
    _saved.setdefault(sig, signal.getsignal(sig))
    signal.signal(sig, handler)


def install_outside_training() -> None:
    """Until :func:`install`: SIGTERM ends a command as Ctrl-C does (an exception, so its
    locks and temporary files are cleaned up, one line), instead of killing it where it is."""
    for sig in INTERRUPTS:
        handle(sig, _on_signal_outside_training)


def restore() -> None:
    """Give every signal back the handler it had before this module set one, and forget the
    run (the CLI calls it when a command ends: a test's process carries on)."""
    global _run_dir, _signalled
    while _saved:
        sig, handler = _saved.popitem()
        signal.signal(sig, handler)
    _run_dir, _signalled = None, False


def install(run_dir: Path, rt: Runtime) -> None:
    """Watch for stop requests for the run in ``run_dir`` (the signal and the file). A stop
    file older than this process is stale (an earlier run's) and is ignored with a warning."""
    global _run_dir, _is_main, _signalled, _started
    _run_dir, _is_main, _signalled, _started = Path(run_dir), rt.is_main, False, time.time()
    for sig in {signal_number(), *INTERRUPTS}:
        handle(sig, _on_signal)
    if _file_age_ok() is False and _is_main:
        log.warning("ignoring %s: it is older than this run (left by an earlier one)",
                    stop_file(_run_dir))


def _file_age_ok() -> bool | None:
    """None: no stop file; True: one written since this process started; False: a stale one."""
    try:
        written = stop_file(_run_dir).stat().st_mtime
    except FileNotFoundError:
        return None
    return written >= _started - STALE_SLACK_S


def asked_here() -> bool:
    """Whether this rank was asked to stop (its signal or a fresh stop file); not collective."""
    if _run_dir is None:
        return False
    return _signalled or bool(_file_age_ok())


def acknowledge() -> None:
    """Consume a request every rank agreed on: the flag is reset and rank 0 removes the stop
    file, so the resumed run does not stop again at once."""
    global _signalled
    _signalled = False
    if _run_dir is not None and _is_main:
        stop_file(_run_dir).unlink(missing_ok=True)


def stop_requested() -> bool:
    """Whether any rank was asked to stop, consumed if so. Collective: every rank must call it
    at the same step (the loop folds the same question into its loss all-reduce instead)."""
    if all_reduce_sum(torch.tensor([float(asked_here())])).item() == 0:
        return False
    acknowledge()
    return True
