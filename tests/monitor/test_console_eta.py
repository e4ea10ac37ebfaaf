"""The console's smoothed tokens/s and ETA, on a fake clock: saves and evals are measured
apart from the steps, so the ETA does not jump after a save, and it counts the saves and
evals still to come."""

import logging
from types import SimpleNamespace

import pytest

from phoenix.monitor.base import MetricsCollector, StepMetrics
from phoenix.monitor.console import Cadence, ConsoleLogger, Progress


@pytest.mark.parametrize("interval,at_end,after,last,want", [
    (100, True, 0, 1000, 10),     # 100 ... 1000: the last step is on the cadence
    (100, True, 0, 1050, 11),     # and one more at the end
    (100, False, 0, 1050, 10),
    (100, False, 250, 1000, 8),   # 300 ... 1000
    (0, True, 5, 10, 1),          # only at the end
    (0, False, 5, 10, 0),
    (100, True, 1000, 1000, 0),   # nothing left
])
def test_cadence_counts_what_is_left(interval, at_end, after, last, want):
    assert Cadence(interval, at_end).count(after, last) == want


def test_progress_takes_saves_and_evals_out_of_the_step_time():
    p = Progress(window=4)
    now = 100.0
    p.step_end(now, tokens=1000, step_time=0.5)  # the first step: no interval yet
    assert p.seconds_per_step() is None and p.eta(10, {}) is None
    for step in range(2, 8):
        if step == 4:
            p.event("save", 30.0)
            now += 30.0
        if step == 6:
            p.event("eval", 12.0)
            now += 12.0
        now += 1.0 if step % 2 else 2.0  # steps alternate 1 s and 2 s of wall time
        p.step_end(now, tokens=1000 if step % 2 else 3000, step_time=0.5)
    assert p.seconds_per_step() == pytest.approx(1.5)  # the last 4 plain steps
    assert p.tokens_per_second() == pytest.approx((1000 + 3000) * 2 / (4 * 0.5))
    assert p.cost("save") == 30.0 and p.cost("eval") == 12.0 and p.cost("other") == 0.0
    assert p.eta(100, {"save": 2, "eval": 3}) == pytest.approx(100 * 1.5 + 2 * 30 + 3 * 12)


def _metrics(step, tokens=1000, step_time=0.5):
    return StepMetrics(step=step, loss=2.0, lr=1e-3, grad_norm=1.0, tokens=tokens,
                       consumed_samples=0, consumed_tokens=0, step_time=step_time,
                       data_time=0.0)


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def _train(console, clock, steps, step_seconds, save_every, save_seconds, eval_every=0,
           eval_seconds=0.0):
    """Drive the console as the trainer does; returns the ETA (s) of each logged line."""
    trainer = SimpleNamespace(layout=SimpleNamespace(is_logging_rank=True),
                              state=SimpleNamespace(step=0))
    console.on_train_start(trainer)
    etas = {}
    for step in range(1, steps + 1):
        clock.now += step_seconds
        eval_due = eval_every and step % eval_every == 0
        console.on_step_end(trainer, _metrics(step))
        metrics = MetricsCollector(step, steps)
        if eval_due:  # the eval callback runs after the console and times itself
            clock.now += eval_seconds
            metrics.record("time/eval", eval_seconds)
        console.log_metrics(trainer, metrics)
        if step % save_every == 0:
            clock.now += save_seconds
            console.on_checkpoint_saved(trainer, f"step_{step}")
        etas[step] = console.last_eta
    return etas


def test_eta_includes_saves_and_does_not_jump_after_them(caplog):
    clock, steps = FakeClock(), 100
    console = ConsoleLogger(steps, 1, saves=Cadence(10, True), evals=Cadence(25, True),
                            window=5, clock=clock)
    with caplog.at_level(logging.INFO, logger="phoenix.train"):
        etas = _train(console, clock, steps, step_seconds=1.0, save_every=10,
                      save_seconds=20.0, eval_every=25, eval_seconds=8.0)
    # Once one save and one eval were measured, the ETA is exact: what is left of
    # 1 s steps, 20 s saves and 8 s evals.
    for step in range(27, steps):
        saves = Cadence(10, True).count(step, steps)
        evals = Cadence(25, True).count(step, steps)
        assert etas[step] == pytest.approx((steps - step) * 1.0 + saves * 20 + evals * 8), step
    # Once every kind was measured it only ever falls (the old elapsed / steps-done
    # estimate rose after every save).
    assert all(etas[s + 1] < etas[s] for s in range(26, steps))
    line = [r.message for r in caplog.records if r.message.startswith("step     50/100")][0]
    assert "2,000 tok/s (avg 2,000)" in line


def test_the_first_line_of_a_job_falls_back_to_elapsed_time():
    clock = FakeClock()
    console = ConsoleLogger(10, 1, clock=clock)
    trainer = SimpleNamespace(layout=SimpleNamespace(is_logging_rank=True),
                              state=SimpleNamespace(step=4))  # resumed at step 4
    console.on_train_start(trainer)
    clock.now = 3.0  # start-up and the first step
    console.on_step_end(trainer, _metrics(5))
    assert console.last_eta == pytest.approx(3.0 * 5)
