"""Python's garbage collector at fixed steps (``train.manual_gc_interval``).

Automatic collection runs when allocation counters cross a threshold, at a different
moment on every rank; a rank that pauses for a full collection holds the others up at the
next collective. With a fixed interval every rank collects after the same step, so the
pause is paid once, together (Megatron-LM's ``--manual-gc``).
"""

from __future__ import annotations

import gc

from phoenix.monitor.base import Callback, StepMetrics


class ManualGC(Callback):
    """``gc.disable()`` for the run, one ``gc.collect()`` at its start and every
    ``interval`` steps (after the step's other callbacks and sinks, before the checkpoint
    check), and automatic collection restored at the end if it was on before."""

    priority = -3000  # after every other callback, the sinks included

    def __init__(self, interval: int):
        if interval <= 0:
            raise ValueError(f"ManualGC: interval must be > 0, got {interval}")
        self.interval = interval
        self.collections = 0
        self._was_enabled = True

    def on_train_start(self, trainer) -> None:
        self._was_enabled = gc.isenabled()
        gc.disable()
        gc.collect()

    def on_step_end(self, trainer, metrics: StepMetrics) -> None:
        if metrics.step % self.interval == 0:
            gc.collect()
            self.collections += 1

    def on_train_end(self, trainer) -> None:
        if self._was_enabled:
            gc.enable()
