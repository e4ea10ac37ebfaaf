"""The training curves every run records: loss, LR, grad norm, counters, step times.

Recorded on the logging rank every ``logging.log_interval`` steps and at the run's last
step, from the step's :class:`~phoenix.monitor.base.StepMetrics`:

``1_train/loss``, ``1_train/lr``, ``1_train/grad_norm`` (megatron's global norm before
clipping; NaN on a skipped step), ``1_train/loss_scale`` (fp16 only),
``1_train/consumed_tokens``, ``1_train/consumed_samples``, ``1_train/skipped_steps`` (so
far), ``3_throughput/tokens_per_sec``, ``3_throughput/step_time``,
``3_throughput/data_time``, and with explicit stages ``1_train/stage`` (the 0-based stage
index). (Why the groups are numbered: phoenix.monitor.tags.)

Where each stage begins (explicit stages), ``1_train/stage`` and a ``stages`` text are
recorded at that step whatever the interval: the step axis of every other curve reads
against it.
"""

from __future__ import annotations

from phoenix.monitor.base import Callback, StepMetrics
from phoenix.monitor.tags import THROUGHPUT, TRAIN


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
            rec.record(f"{TRAIN}/stage", stage.index)
            rec.record_text("stages", f"stage {stage.index} '{stage.name}' began at step "
                                      f"{stage.start_step} (after {stage.start_step} optimizer steps)")
        if not rec.due():
            return
        if explicit:
            rec.record(f"{TRAIN}/stage", stage.index)
        rec.record(f"{TRAIN}/loss", m.loss)
        rec.record(f"{TRAIN}/lr", m.lr)
        rec.record(f"{TRAIN}/grad_norm", m.grad_norm)
        if m.loss_scale is not None:
            rec.record(f"{TRAIN}/loss_scale", m.loss_scale)
        rec.record(f"{TRAIN}/consumed_tokens", m.consumed_tokens)
        rec.record(f"{TRAIN}/consumed_samples", m.consumed_samples)
        rec.record(f"{TRAIN}/skipped_steps", self.skipped)
        rec.record(f"{THROUGHPUT}/tokens_per_sec", m.tokens_per_second)
        rec.record(f"{THROUGHPUT}/step_time", m.step_time)
        rec.record(f"{THROUGHPUT}/data_time", m.data_time)
