"""TensorBoard scalars, written by one rank (the one that holds the loss).

Tags: ``train/loss``, ``train/lr``, ``train/grad_norm``, ``train/loss_scale`` (fp16),
``train/consumed_tokens``, ``train/consumed_samples``, ``throughput/tokens_per_sec``,
``throughput/step_time``, ``throughput/data_time``, ``train/skipped_steps``. The x axis is
the optimizer step. The resolved config is logged once as text under ``config``.
"""

from __future__ import annotations

from pathlib import Path

from phoenix.train.callbacks import Callback, StepMetrics


def find_writer(trainer):
    """The run's SummaryWriter (held by its TensorBoardLogger on the logging rank), or None
    on other ranks and when TensorBoard is off. Other monitors write through it."""
    for cb in trainer.callbacks:
        if isinstance(cb, TensorBoardLogger) and cb.writer is not None:
            return cb.writer
    return None


class TensorBoardLogger(Callback):
    def __init__(self, log_dir: str | Path, interval: int, config_yaml: str):
        self.log_dir, self.interval, self.config_yaml = Path(log_dir), interval, config_yaml
        self.writer = None
        self.skipped = 0

    def on_train_start(self, trainer) -> None:
        if not trainer.layout.is_logging_rank:
            return
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(self.log_dir))
        self.skipped = trainer.state.skipped_steps
        self.writer.add_text("config", "```yaml\n" + self.config_yaml + "\n```", trainer.state.step)

    def on_step_end(self, trainer, m: StepMetrics) -> None:
        if self.writer is None:
            return
        self.skipped += int(m.skipped)
        if m.step % self.interval and m.step != trainer.cfg.train.steps:
            return
        w, s = self.writer, m.step
        w.add_scalar("train/loss", m.loss, s)
        w.add_scalar("train/lr", m.lr, s)
        w.add_scalar("train/grad_norm", m.grad_norm, s)
        if m.loss_scale is not None:
            w.add_scalar("train/loss_scale", m.loss_scale, s)
        w.add_scalar("train/consumed_tokens", m.consumed_tokens, s)
        w.add_scalar("train/consumed_samples", m.consumed_samples, s)
        w.add_scalar("train/skipped_steps", self.skipped, s)
        w.add_scalar("throughput/tokens_per_sec", m.tokens_per_second, s)
        w.add_scalar("throughput/step_time", m.step_time, s)
        w.add_scalar("throughput/data_time", m.data_time, s)

    def on_checkpoint_saved(self, trainer, path) -> None:
        if self.writer is not None:
            self.writer.flush()

    def on_train_end(self, trainer) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
