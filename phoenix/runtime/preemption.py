"""Preemption, Ctrl-C and time limits: finish the current step, save, exit 0.

SLURM sends SIGUSR1 (with ``--signal=USR1@SECONDS``) before the walltime, and SIGTERM
when it preempts or cancels a job; torchrun forwards SIGTERM to its workers. Ctrl-C is
SIGINT (forwarded to the workers by torchrun, which kills them 30 s later, or by
``phoenix torchrun``, which waits for them: phoenix.runtime.launch). On the first
SIGTERM, SIGUSR1 or SIGINT a rank only sets a flag; the trainer asks after every step
whether any rank has a reason to stop (one all-reduce of one number, so every rank
stops after the same step), saves a checkpoint and returns normally. A second signal
means "now": the default handler is restored and the signal re-raised, so the process
exits at once (by the signal).

``train.time_limit_minutes`` is the same decision from inside, measured from when the
trainer starts: useful where the scheduler gives no warning signal.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from typing import Optional

from phoenix.runtime.distributed import any_rank

log = logging.getLogger(__name__)

SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


class StopRequest:
    """Collects this rank's reasons to stop after the current step (signals, time limit)."""

    def __init__(self, time_limit_minutes: Optional[float] = None):
        self.deadline = (time.monotonic() + 60.0 * time_limit_minutes
                         if time_limit_minutes else None)
        self.signal_name: Optional[str] = None
        self._previous: dict[int, object] = {}

    def install(self) -> "StopRequest":
        """Handle SIGTERM / SIGUSR1 / SIGINT from now on (only the main thread may;
        elsewhere, e.g. a trainer driven from a worker thread, only the time limit applies)."""
        if threading.current_thread() is not threading.main_thread():
            return self
        for sig in SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self.signal_name is not None:  # a second signal: exit now
            log.warning("%s received again: exiting without saving", name)
            signal.signal(signum, signal.SIG_DFL)
            signal.raise_signal(signum)
            return
        self.signal_name = name
        log.warning("%s received: finishing the current step, then saving and exiting "
                    "(send it again to exit at once)", name)

    def local_reason(self) -> Optional[str]:
        if self.signal_name is not None:
            return f"{self.signal_name} received"
        if self.deadline is not None and time.monotonic() >= self.deadline:
            return "train.time_limit_minutes reached"
        return None

    def agreed(self) -> Optional[str]:
        """Collective: a reason when any rank has one (the same verdict on every rank)."""
        reason = self.local_reason()
        if any_rank(reason is not None) and reason is None:
            reason = "another rank was asked to stop"
        return reason
