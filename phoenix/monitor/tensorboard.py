"""TensorBoard scalars, written by one rank (the one that holds the loss).

Tags: ``train/loss``, ``train/lr``, ``train/grad_norm``, ``train/loss_scale`` (fp16),
``train/consumed_tokens``, ``train/consumed_samples``, ``throughput/tokens_per_sec``,
``throughput/step_time``, ``throughput/data_time``, ``train/skipped_steps``. The x axis is
the optimizer step. The resolved config is logged once as text under ``config``.
"""

from __future__ import annotations

import queue
import threading
from pathlib import Path

from phoenix.train.callbacks import Callback, StepMetrics


class BackgroundWriter:
    """A ``SummaryWriter`` whose writes run on a background thread.

    Serialising and writing an event costs ~0.1 ms; with per-layer norms a logging step
    writes hundreds of scalars, which would otherwise stall the training thread. Calls are
    queued in order and executed by one thread; ``flush`` and ``close`` wait for the
    queue to drain, so a reader after ``close`` sees every event. Tensor values are turned
    into floats when queued, so later in-place updates cannot change what is logged.
    """

    def __init__(self, log_dir: str):
        from torch.utils.tensorboard import SummaryWriter

        self._writer = SummaryWriter(log_dir=log_dir)
        self._queue: queue.Queue = queue.Queue()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="phoenix-tensorboard", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is None:
                    return
                name, args = item
                if self._error is None:
                    getattr(self._writer, name)(*args)
            except BaseException as e:  # reported on the training thread's next call
                self._error = e
            finally:
                self._queue.task_done()

    def _put(self, name: str, *args) -> None:
        if self._error is not None:
            raise RuntimeError(f"TensorBoard writer failed: {self._error}") from self._error
        self._queue.put((name, args))

    def add_scalar(self, tag: str, value, step: int) -> None:
        self._put("add_scalar", tag, float(value), int(step))

    def add_text(self, tag: str, text: str, step: int) -> None:
        self._put("add_text", tag, text, int(step))

    def add_histogram(self, tag: str, values, step: int) -> None:
        self._put("add_histogram", tag, values.detach().float().cpu().clone(), int(step))

    def flush(self) -> None:
        self._put("flush")
        self._queue.join()

    def close(self) -> None:
        self.flush()
        self._queue.put(None)
        self._thread.join()
        self._writer.close()


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
        self.writer = BackgroundWriter(str(self.log_dir))
        self.skipped = trainer.state.skipped_steps
        self.writer.add_text("config", "```yaml\n" + self.config_yaml + "\n```", trainer.state.step)

    def on_step_end(self, trainer, m: StepMetrics) -> None:
        if self.writer is None:
            return
        self.skipped += int(m.skipped)
        stage = m.extra.get("stage")
        if stage is not None and m.extra.get("stage_began") and trainer.stages.explicit:
            # Where each stage began: the step axis of every other curve reads against it.
            self.writer.add_scalar("train/stage", stage.index, m.step)
            self.writer.add_text("stages", f"stage {stage.index} '{stage.name}' began at step "
                                 f"{stage.start_step} (after {stage.start_step} optimizer steps)",
                                 m.step)
        if m.step % self.interval and m.step != trainer.cfg.train.steps:
            return
        w, s = self.writer, m.step
        if stage is not None and trainer.stages.explicit:
            w.add_scalar("train/stage", stage.index, s)
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
