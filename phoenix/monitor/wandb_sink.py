"""Weights & Biases: a second sink beside TensorBoard (``logging.wandb``).

:class:`WandbLogger` writes what :class:`~phoenix.monitor.tensorboard.TensorBoardLogger`
writes, from the same :class:`~phoenix.monitor.base.MetricsCollector`, with the same tags
at the same steps: scalars as numbers, images as ``wandb.Image``, histograms as
``wandb.Histogram`` (bucket counts as they are), texts as ``wandb.Html`` (preformatted).
The resolved config is the W&B run's config. Only the logging rank writes.

One W&B run per phoenix run: its id is kept in ``<output_dir>/wandb_run_id`` (written
atomically at the first start), and every later job of the run (a resume, a restart)
opens it again with ``resume="allow"``. W&B keeps one value per step and refuses steps
below the last one it holds, so the steps a resumed job re-runs after its checkpoint
keep the values the earlier job logged (TensorBoard purges and rewrites them).

wandb is an optional dependency: ``logging.wandb`` without it is refused when the
config is read (:class:`phoenix.config.monitoring.WandbConfig`).
"""

from __future__ import annotations

import html
import logging
import uuid
from pathlib import Path

from phoenix.config import ConfigError
from phoenix.monitor.base import Callback, Histogram, MetricsCollector

log = logging.getLogger("phoenix.monitor")

RUN_ID_FILE = "wandb_run_id"


def run_id(out_dir: Path) -> str:
    """The W&B run id of the phoenix run in ``out_dir`` (made and kept at the first call)."""
    from phoenix.io import atomic_write_text

    path = Path(out_dir) / RUN_ID_FILE
    if path.is_file():
        text = path.read_text().strip()
        if text:
            return text
    new = uuid.uuid4().hex[:12]
    atomic_write_text(path, new + "\n")
    return new


def wandb_histogram(values):
    """``wandb.Histogram`` of a 1-D tensor of values, or of a
    :class:`~phoenix.monitor.base.Histogram`'s bucket counts and edges (as it is: W&B
    keeps up to 512 buckets)."""
    import numpy as np
    import wandb

    if isinstance(values, Histogram):
        return wandb.Histogram(np_histogram=(np.asarray(values.bucket_counts, dtype=np.float64),
                                             np.asarray(values.bucket_edges, dtype=np.float64)))
    return wandb.Histogram(values.detach().float().cpu().numpy())


class WandbLogger(Callback):
    """The W&B sink (see the module docstring). ``settings``: the ``logging.wandb``
    section (:class:`phoenix.config.monitoring.WandbConfig`); ``config``: the resolved
    config as plain data (the W&B run's config)."""

    # With the TensorBoard sink, after every producer has recorded the step.
    priority = -1000

    def __init__(self, settings, out_dir: str | Path, run_name: str, config: dict):
        self.settings, self.out_dir = settings, Path(out_dir)
        self.run_name, self.config = run_name, config
        self.run = None

    def on_train_start(self, trainer) -> None:
        if not trainer.layout.is_logging_rank:
            return
        import wandb

        s = self.settings
        try:
            self.run = wandb.init(
                project=s.project, entity=s.entity, name=s.name or self.run_name,
                id=run_id(self.out_dir), resume="allow", mode=s.mode, tags=list(s.tags) or None,
                dir=str(Path(s.dir) if s.dir else self.out_dir), config=self.config)
        except Exception as e:  # wandb raises its own kinds (login, network, usage)
            raise ConfigError(f"logging.wandb: wandb.init failed: {str(e).splitlines()[0]}") from None
        log.info("wandb: run %s (%s mode) in %s", self.run.id, s.mode, self.run.dir)

    def log_metrics(self, trainer, metrics: MetricsCollector) -> None:
        if self.run is None:
            return
        import numpy as np
        import wandb

        row: dict = dict(metrics.scalars)
        for tag, text in metrics.texts.items():
            row[tag] = wandb.Html(f"<pre>{html.escape(text)}</pre>")
        for tag, image in metrics.images.items():
            row[tag] = wandb.Image(np.asarray(image, dtype=np.uint8))
        for tag, values in metrics.histograms.items():
            row[tag] = wandb_histogram(values)
        if row:
            self.run.log(row, step=metrics.step)

    def on_train_end(self, trainer) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None
