"""The training curves every run records: loss, LR, grad norm, counters, step times.

Recorded on the logging rank every ``logging.log_interval`` steps and at the run's last
step, from the step's :class:`~phoenix.monitor.base.StepMetrics`:

``train/loss``, ``train/lr``, ``train/grad_norm`` (megatron's global norm before
clipping; NaN on a skipped step), ``train/loss_scale`` (fp16 only),
``train/consumed_tokens``, ``train/consumed_samples``, ``train/skipped_steps`` (so far),
``throughput/tokens_per_sec``, ``throughput/step_time``, ``throughput/data_time``, and
with explicit stages ``train/stage`` (the 0-based stage index).

Where each stage begins (explicit stages), ``train/stage`` and a ``stages`` text are
recorded at that step whatever the interval: the step axis of every other curve reads
against it.
"""

from __future__ import annotations

from phoenix.monitor.base import Callback, StepMetrics


class TrainScalars(Callback):
    # Records before the other producers of the step (the order of a step's tags).
    priority = 900

    def __init__(self):
        self.skipped = 0

    def on_train_start(self, trainer) -> None:
        self.skipped = trainer.state.skipped_steps

    def on_step_end(self, trainer, m: StepMetrics) -> None:
        self.skipped += int(m.skipped)
        if not trainer.layout.is_logging_rank:
            return
        rec = trainer.metrics
        stage = m.stage
        explicit = stage is not None and trainer.stages.explicit
        if explicit and m.stage_began:
            rec.record("train/stage", stage.index)
            rec.record_text("stages", f"stage {stage.index} '{stage.name}' began at step "
                                      f"{stage.start_step} (after {stage.start_step} optimizer steps)")
        if not rec.due():
            return
        if explicit:
            rec.record("train/stage", stage.index)
        rec.record("train/loss", m.loss)
        rec.record("train/lr", m.lr)
        rec.record("train/grad_norm", m.grad_norm)
        if m.loss_scale is not None:
            rec.record("train/loss_scale", m.loss_scale)
        rec.record("train/consumed_tokens", m.consumed_tokens)
        rec.record("train/consumed_samples", m.consumed_samples)
        rec.record("train/skipped_steps", self.skipped)
        rec.record("throughput/tokens_per_sec", m.tokens_per_second)
        rec.record("throughput/step_time", m.step_time)
        rec.record("throughput/data_time", m.data_time)
