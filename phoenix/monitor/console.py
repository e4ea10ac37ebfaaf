"""Console progress line: step, loss, LR, grad norm, tokens/s (now and smoothed), ETA.

One line every ``logging.log_interval`` steps (and at the run's last step), on the logging
rank::

    step   1200/10000 | loss 2.3141 | lr 2.950e-04 | grad_norm 0.412 | 48,210 tok/s
        (avg 47,950) | 340 ms/step | eta 52m10s

``tok/s``: this step's loss-bearing tokens over its step time; ``avg``: the same over the
last ``window`` steps (tokens summed, step times summed), so one slow batch does not make
the number jump. ``ms/step``: this step's time (data to LR update).

ETA. Saves and evals are not spread evenly over the steps: a mean wall time per step that
includes them jumps after every save. :class:`Progress` measures them apart instead: the
wall time between two step ends, less the save and eval seconds measured inside it, is a
plain step; the ETA is ``remaining steps x mean plain step (over the window) + remaining
saves x measured seconds per save + remaining evals x measured seconds per eval``, the
remaining counts from the run's ``checkpoint.save_interval`` / ``save_at_end`` and
``eval.interval`` / ``eval.at_end``. Until a save (or eval) has been measured its cost is
unknown and counted as 0. The job's first step (start-up, compilation) is left out.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass
from typing import Callable

from phoenix.monitor.base import Callback, MetricsCollector, StepMetrics, is_logging_step

log = logging.getLogger("phoenix.train")


def _fmt_duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


@dataclass(frozen=True)
class Cadence:
    """When something periodic runs: every ``interval`` steps (0: never) and, with
    ``at_end``, after the last step."""

    interval: int = 0
    at_end: bool = False

    def count(self, after: int, last: int) -> int:
        """How many times it runs after step ``after`` up to step ``last`` (inclusive)."""
        if last <= after:
            return 0
        n = last // self.interval - after // self.interval if self.interval > 0 else 0
        if self.at_end and not (self.interval > 0 and last % self.interval == 0):
            n += 1
        return n


class Progress:
    """Smoothed tokens/s and an ETA that accounts for saves and evals; the caller gives
    the time (``now``, seconds), so it is a pure function of what it was told.

    Call :meth:`step_end` at the end of every step and :meth:`event` for every save or
    eval with its measured seconds (before the next ``step_end``: it belongs to the wall
    time between the two). ``window``: steps the averages run over; ``costs_kept``: the
    latest measurements averaged per kind of event.
    """

    def __init__(self, window: int = 20, costs_kept: int = 5):
        if window < 1:
            raise ValueError(f"Progress: window must be >= 1, got {window}")
        self._throughput: deque = deque(maxlen=window)  # (tokens, step seconds)
        self._plain: deque = deque(maxlen=window)       # wall seconds, events taken out
        self._costs: dict[str, deque] = {}
        self._costs_kept = costs_kept
        self._pending = 0.0  # event seconds since the previous step end
        self._last: float | None = None

    def step_end(self, now: float, tokens: int = 0, step_time: float = 0.0) -> None:
        if self._last is not None:
            self._plain.append(max(now - self._last - self._pending, 0.0))
        self._last, self._pending = now, 0.0
        if step_time > 0:
            self._throughput.append((tokens, step_time))

    def event(self, kind: str, seconds: float) -> None:
        self._costs.setdefault(kind, deque(maxlen=self._costs_kept)).append(seconds)
        self._pending += seconds

    def tokens_per_second(self) -> float | None:
        """Tokens over step time summed over the window (None before any step)."""
        seconds = sum(t for _, t in self._throughput)
        return sum(n for n, _ in self._throughput) / seconds if seconds > 0 else None

    def seconds_per_step(self) -> float | None:
        """Mean wall seconds of a step without saves and evals (None until two steps)."""
        return sum(self._plain) / len(self._plain) if self._plain else None

    def cost(self, kind: str) -> float:
        """Mean measured seconds of one ``kind`` event (0 until one was measured)."""
        values = self._costs.get(kind)
        return sum(values) / len(values) if values else 0.0

    def eta(self, remaining_steps: int, remaining_events: dict[str, int]) -> float | None:
        """Seconds to go: steps at the plain rate plus each kind's count x its cost."""
        per_step = self.seconds_per_step()
        if per_step is None:
            return None
        return (remaining_steps * per_step
                + sum(n * self.cost(kind) for kind, n in remaining_events.items()))


class ConsoleLogger(Callback):
    """The progress line of the module docstring. ``saves``/``evals``: the run's save and
    eval cadences (for the ETA); ``clock``: seconds (tests give a fake one)."""

    # First: a step's progress line comes before the spike and eval lines of that step.
    priority = 1000

    def __init__(self, total_steps: int, interval: int, *, saves: Cadence = Cadence(),
                 evals: Cadence = Cadence(), window: int = 20,
                 clock: Callable[[], float] = time.perf_counter):
        self.total_steps, self.interval = total_steps, interval
        self.cadences = {"save": saves, "eval": evals}
        self.progress = Progress(window)
        self._clock = clock
        self._start = None
        self._start_step = 0
        self._logged_at = None  # when this step's sinks began: a save follows them
        self.last_eta: float | None = None
        """Seconds to go at the latest progress line (logging rank)."""

    def on_train_start(self, trainer) -> None:
        self._start = self._clock()
        self._start_step = trainer.state.step
        self._logged_at = None

    def on_step_end(self, trainer, m: StepMetrics) -> None:
        self.progress.step_end(self._clock(), m.tokens, m.step_time)
        if not trainer.layout.is_logging_rank:
            return
        if not is_logging_step(m.step, self.interval, self.total_steps):
            return
        eta = self.progress.eta(self.total_steps - m.step,
                                {kind: c.count(m.step, self.total_steps)
                                 for kind, c in self.cadences.items()})
        if eta is None:  # the job's first step: no plain step measured yet
            done = m.step - self._start_step
            eta = (self._clock() - self._start) / max(done, 1) * (self.total_steps - m.step)
        self.last_eta = eta
        smooth = self.progress.tokens_per_second()
        avg = f" (avg {smooth:,.0f})" if smooth is not None else ""
        skipped = f"  SKIPPED ({m.skip_reason or 'skipped'})" if m.skipped else ""
        log.info(f"step {m.step:>6}/{self.total_steps} | loss {m.loss:.4f} | lr {m.lr:.3e} | "
                 f"grad_norm {m.grad_norm:.3f} | {m.tokens_per_second:,.0f} tok/s{avg} | "
                 f"{m.step_time * 1000:.0f} ms/step | eta {_fmt_duration(eta)}{skipped}")

    def log_metrics(self, trainer, metrics: MetricsCollector) -> None:
        # The eval callback measured its own seconds (recorded on the logging rank).
        seconds = metrics.get("time/eval")
        if seconds is not None:
            self.progress.event("eval", seconds)
        self._logged_at = self._clock()

    def on_checkpoint_saved(self, trainer, path) -> None:
        # The trainer saves right after the step's sinks; a save before the first step
        # (checkpoint.save_initial) has no start to measure from.
        if self._logged_at is not None:
            self.progress.event("save", self._clock() - self._logged_at)
            self._logged_at = None
