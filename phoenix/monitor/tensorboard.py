"""TensorBoard: the sink that writes a step's recorded metrics, on one rank.

Where: every run writes under ``<output_dir>/tensorboard/<name>/`` (:func:`tensorboard_dir`,
``name`` the recipe's top-level ``name``), so TensorBoard pointed at a folder that holds
several output dirs (``tensorboard --logdir runs/``) lists each run by its name
(``quickstart/tensorboard/quickstart``), and pointed at one output dir's ``tensorboard/``
it lists ``quickstart``. A resumed run (same output dir, same name) appends to the same
folder; its first step hides what earlier jobs wrote from that step on (see
:class:`TensorBoardLogger`).

:class:`TensorBoardLogger` is the only owner of a ``SummaryWriter`` in a run; every
monitor records its scalars into the step's metrics collector (see
:mod:`phoenix.monitor.base`) and this sink writes them, on the logging rank (the one
that holds the loss), at the optimizer step (steps completed) of the collector. The
resolved config is logged once as text under ``config``. Which tags exist is documented
by their producers; the groups and their order: :mod:`phoenix.monitor.tags`.
"""

from __future__ import annotations

import logging
import queue
import threading
from pathlib import Path

from phoenix.monitor.base import Callback, Histogram, MetricsCollector

log = logging.getLogger(__name__)


def tensorboard_dir(output_dir: str | Path, name: str) -> Path:
    """``<output_dir>/tensorboard/<name>``: the folder of a run's event files. ``name``
    (the recipe's ``name``) becomes the run's name in TensorBoard; ValueError when it is
    empty or would leave ``tensorboard/`` (absolute, ``..``)."""
    parts = Path(name).parts
    if not name or Path(name).is_absolute() or ".." in parts:
        raise ValueError(f"run name {name!r}: must be non-empty and stay inside tensorboard/ "
                         f"(it names the TensorBoard run)")
    return Path(output_dir) / "tensorboard" / name


class BackgroundWriter:
    """A ``SummaryWriter`` whose writes run on a background thread.

    Serialising and writing an event costs ~0.1 ms; with per-layer norms a logging step
    writes hundreds of scalars, which would otherwise stall the training thread. Calls are
    queued in order and executed by one thread; ``flush`` and ``close`` wait for the
    queue to drain, so a reader after ``close`` sees every event. Tensor values are turned
    into floats when queued, so later in-place updates cannot change what is logged.
    """

    def __init__(self, log_dir: str, purge_step: int | None = None):
        """``purge_step``: events at this step and later, left by an earlier job in
        ``log_dir``, are hidden from readers (TensorBoard's own purge on restart)."""
        from torch.utils.tensorboard import SummaryWriter

        self._writer = SummaryWriter(log_dir=log_dir, purge_step=purge_step)
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
                if self._error is None:  # a writer method, or one of ours (_add_png)
                    target = self if name.startswith("_") else self._writer
                    getattr(target, name)(*args)
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

    def add_image(self, tag: str, image, step: int) -> None:
        """``image``: RGB ``uint8 [H, W, 3]`` (copied now)."""
        import numpy as np

        self._put("_add_png", tag, np.array(image, dtype=np.uint8), int(step))

    def _add_png(self, tag: str, image, step: int) -> None:
        """Runs on the writer thread. The image summary is built here with phoenix's own
        PNG encoder: ``SummaryWriter.add_image`` needs PIL, which is no run-time
        dependency of phoenix."""
        from tensorboard.compat.proto.summary_pb2 import Summary

        from phoenix.monitor.heatmap import encode_png

        height, width, _ = image.shape
        png = Summary.Image(height=height, width=width, colorspace=3,
                            encoded_image_string=encode_png(image))
        summary = Summary(value=[Summary.Value(tag=tag, image=png)])
        self._writer._get_file_writer().add_summary(summary, step)

    def add_histogram(self, tag: str, values, step: int) -> None:
        """``values``: a 1-D tensor (copied now and bucketed by the writer), or a
        :class:`~phoenix.monitor.base.Histogram` of bucket counts (written as they are)."""
        if isinstance(values, Histogram):
            h = values
            self._put("add_histogram_raw", tag, h.min, h.max, h.num, h.sum, h.sum_squares,
                      list(h.bucket_limits), list(h.bucket_counts), int(step))
        else:
            self._put("add_histogram", tag, values.detach().float().cpu().clone(), int(step))

    def flush(self) -> None:
        self._put("flush")
        self._queue.join()

    def close(self) -> None:
        self.flush()
        self._queue.put(None)
        self._thread.join()
        self._writer.close()


class TensorBoardLogger(Callback):
    """The TensorBoard sink: the one owner of the run's ``SummaryWriter``.

    On the logging rank it opens a :class:`BackgroundWriter` on ``log_dir`` at train
    start, hiding what earlier jobs wrote from the job's first step on (and logs
    ``config_yaml`` as text under ``config`` at that step), writes every scalar and
    text recorded in a step's :class:`~phoenix.monitor.base.MetricsCollector` at that step,
    flushes after each checkpoint and closes at the end. It decides nothing about what is
    written when: the producers record only on their logging steps. Images (RGB arrays)
    are written with ``add_image``, histograms with ``add_histogram`` (1-D tensors of values)
or ``add_histogram_raw`` (:class:`~phoenix.monitor.base.Histogram` bucket counts).
    """

    # Runs last: its on_train_end closes the writer after every other callback is done.
    priority = -1000

    def __init__(self, log_dir: str | Path, config_yaml: str = ""):
        self.log_dir, self.config_yaml = Path(log_dir), config_yaml
        self.writer = None

    def on_train_start(self, trainer) -> None:
        if not trainer.layout.is_logging_rank:
            return
        # Every job purges what earlier jobs wrote from its first step on: a resumed job
        # re-runs the steps after its checkpoint, a job restarted before the first
        # checkpoint re-runs them all, and two jobs may resume from the same checkpoint.
        # So every tag has each step once, whatever the kind of restart. The config is
        # logged at that first step too (at the start step it would be kept twice).
        first = trainer.state.step + 1
        parent = self.log_dir.parent
        if any(parent.glob("events.out.tfevents.*")):  # written before runs had a name
            log.info("TensorBoard: %s holds events of an earlier layout (run '.'); this run "
                     "writes to %s", parent, self.log_dir)
        self.writer = BackgroundWriter(str(self.log_dir), purge_step=first)
        self.writer.add_text("config", "```yaml\n" + self.config_yaml + "\n```", first)

    def log_metrics(self, trainer, metrics: MetricsCollector) -> None:
        if self.writer is None:
            return
        for tag, text in metrics.texts.items():
            self.writer.add_text(tag, text, metrics.step)
        for tag, value in metrics.scalars.items():
            self.writer.add_scalar(tag, value, metrics.step)
        for tag, image in metrics.images.items():
            self.writer.add_image(tag, image, metrics.step)
        for tag, values in metrics.histograms.items():
            self.writer.add_histogram(tag, values, metrics.step)

    def on_checkpoint_saved(self, trainer, path) -> None:
        if self.writer is not None:
            self.writer.flush()

    def on_train_end(self, trainer) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
