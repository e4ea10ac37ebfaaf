"""Human-readable progress lines: step, loss, LR, grad norm, tokens/s, ETA."""

from __future__ import annotations

import logging
import time

from phoenix.monitor.base import Callback, StepMetrics, is_logging_step

log = logging.getLogger("phoenix.train")


def _fmt_duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


class ConsoleLogger(Callback):
    # First: a step's progress line comes before the spike and eval lines of that step.
    priority = 1000

    def __init__(self, total_steps: int, interval: int):
        self.total_steps, self.interval = total_steps, interval
        self._start = None
        self._start_step = 0

    def on_train_start(self, trainer) -> None:
        self._start = time.perf_counter()
        self._start_step = trainer.state.step

    def on_step_end(self, trainer, m: StepMetrics) -> None:
        if not trainer.layout.is_logging_rank:
            return
        if not is_logging_step(m.step, self.interval, self.total_steps):
            return
        elapsed = time.perf_counter() - self._start
        done = m.step - self._start_step
        eta = elapsed / max(done, 1) * (self.total_steps - m.step)
        skipped = f"  SKIPPED ({m.skip_reason or 'skipped'})" if m.skipped else ""
        log.info(f"step {m.step:>6}/{self.total_steps} | loss {m.loss:.4f} | lr {m.lr:.3e} | "
                 f"grad_norm {m.grad_norm:.3f} | {m.tokens_per_second:,.0f} tok/s | "
                 f"{m.step_time * 1000:.0f} ms/step | eta {_fmt_duration(eta)}{skipped}")
