"""Per-dataset loss and tokens of the blend, in TensorBoard.

Every ``interval`` steps (and the run's last step) :class:`DatasetLossMonitor` writes,
for each dataset of ``data.datasets`` (named by ``display_name``; ``dataset_id`` is the
index in that list):

``2_datasets/loss/<name>``
    Token-weighted mean loss of that dataset's samples in the **global** batches of every
    step since the previous write (the logging interval, this step included):
    ``sum(loss sums) / sum(loss tokens)`` over its samples on every data-parallel rank,
    so a dataset that comes in bursts between two writes is still seen. Datasets with no
    loss-bearing token in the interval are not written (no fake zeros). At interval 1 the
    token-weighted mean of these values over datasets is ``1_train/loss``.
``2_datasets/tokens/<name>``
    Loss-bearing tokens (the ``loss_mask`` sum, the unit of ``1_train/consumed_tokens``)
    of that dataset trained on so far, this step included; written for every dataset
    (0 for one not seen yet is a true count). Skipped steps count: their batch is
    consumed.

Where the numbers come from: after forward-backward ``trainer.batch_report`` holds this
rank's per-sample ``(loss sum, loss tokens)`` and ``dataset_id`` (last pipeline stage
only). Each last-stage rank adds them up per dataset on the device at every step (no
host copy); on logging steps one ``all_reduce(SUM)`` over the layout's ``dp_group``
(megatron's data-parallel group) makes the interval's sums and the cumulative token
counts global (the TP ranks of a stage hold identical reports, so TP is not reduced),
and one host copy reads them. The values are recorded into the step's metrics collector
on the logging rank (see :mod:`phoenix.monitor.base`), which the TensorBoard sink
writes.

Resume: the cumulative counts are the monitor's state. ``state_dict()`` returns
``{"tokens": {name: int}}`` (global, after the step) and is **collective** — call it on
every rank, as ``Trainer.save`` runs (it reduces over DP on the last stage and
broadcasts from the last rank, so rank 0 holds the values to save). Store it in the
checkpoint's trainer state and give it back with ``load_state_dict()`` before training
resumes (counts are matched by dataset name; a dataset added since starts at 0). A run
resumed without that state counts from 0, and says so in the log.
"""

from __future__ import annotations

import logging

import torch
import torch.distributed as dist

from phoenix.monitor.base import Callback, StepMetrics
from phoenix.monitor.tags import DATASETS

log = logging.getLogger(__name__)


def per_dataset_sums(report: dict, num_datasets: int, device=None) -> torch.Tensor:
    """``[num_datasets, 2]`` float64 (loss sum, loss tokens) of a ``batch_report``, on the
    device of its per-sample sums (``device`` when the report is empty). No host copy of
    device values: the dataset ids are the loader's host tensors."""
    per_sample = report.get("per_sample") if report else None
    if per_sample is not None:
        device = per_sample.device
    out = torch.zeros(num_datasets, 2, dtype=torch.float64, device=device)
    if per_sample is not None and len(per_sample):
        ids = report["dataset_id"].reshape(-1).long()
        if int(ids.min()) < 0 or int(ids.max()) >= num_datasets:
            raise ValueError(f"DatasetLossMonitor: dataset_id {ids.tolist()} outside "
                             f"[0, {num_datasets}) (data.datasets has {num_datasets})")
        out.index_add_(0, ids.to(out.device, non_blocking=True), per_sample.detach().double())
    return out


def dataset_tags(names: list[str], sums, cumulative) -> dict:
    """TensorBoard ``{tag: value}`` from global per-dataset sums ``[D, 2]`` (loss sum, loss
    tokens over the interval) and cumulative token counts ``[D]`` (tensors or lists)."""
    sums = sums.tolist() if torch.is_tensor(sums) else sums
    cumulative = cumulative.tolist() if torch.is_tensor(cumulative) else cumulative
    tags = {}
    for name, (loss_sum, tokens) in zip(names, sums):
        if tokens > 0:
            tags[f"{DATASETS}/loss/{name}"] = loss_sum / tokens
    for name, tokens in zip(names, cumulative):
        tags[f"{DATASETS}/tokens/{name}"] = tokens
    return tags


class DatasetLossMonitor(Callback):
    """Writes ``2_datasets/loss/<name>`` and ``2_datasets/tokens/<name>`` (module docstring).

    ``interval``: every N steps (0: never write, but still count tokens). ``names``: the
    dataset names by ``dataset_id``; default ``[e.display_name for e in
    trainer.cfg.data.datasets]``. Every rank must have the monitor (``state_dict`` is
    collective; the logging-step reduction involves the last stage's ranks). After a
    logged step, ``last`` holds ``{tag: value}`` on the logging rank.
    """

    priority = 500  # a producer (see the trainer's callback list for the order)
    state_key = "dataset_loss"
    """Key of its token counts in the checkpoint bundle (stable across renames)."""

    def __init__(self, interval: int, names: list[str] | None = None, log_last_step: bool = True):
        if interval < 0:
            raise ValueError(f"DatasetLossMonitor: interval must be >= 0, got {interval}")
        self.interval, self.log_last_step = interval, log_last_step
        self.names = list(names) if names is not None else None
        self.last: dict[str, float] = {}
        self._base: dict[str, float] = {}  # global counts when this process started (resume)
        self._tokens = None  # this rank's per-dataset tokens since then, float64 [D], device
        self._sums = None  # this rank's (loss sum, tokens) since the last write, [D, 2], device
        self._layout = None
        self._loaded = False
        self._warned_ids = False

    # -- state --------------------------------------------------------------------
    def _with_base(self, counts: list[float]) -> list[float]:
        return [c + float(self._base.get(n, 0.0)) for n, c in zip(self.names, counts)]

    def state_dict(self) -> dict:
        """``{"tokens": {name: count}}``, global; collective (call on every rank)."""
        if self._layout is None or self._tokens is None:  # not started: what was loaded
            return {"tokens": {k: int(v) for k, v in self._base.items()}}
        layout = self._layout
        counts = torch.zeros(len(self.names), dtype=torch.float64, device=layout.device)
        if layout.is_last_stage:
            counts = self._tokens.clone()
            if layout.dp_size > 1:
                dist.all_reduce(counts, group=layout.dp_group)
        if layout.world_size > 1:  # the last rank is on the last stage
            dist.broadcast(counts, src=layout.world_size - 1)
        counts = self._with_base(counts.tolist())
        return {"tokens": {name: int(v) for name, v in zip(self.names, counts)}}

    def load_state_dict(self, state: dict) -> None:
        """Restore the counts saved by :meth:`state_dict` (before ``on_train_start`` or
        at any point: the counts of this process so far are kept on top)."""
        self._base = {str(k): float(v) for k, v in dict(state.get("tokens", {})).items()}
        self._loaded = True

    # -- hooks --------------------------------------------------------------------
    def on_train_start(self, trainer) -> None:
        if self.names is None:
            self.names = [e.display_name for e in trainer.cfg.data.datasets]
        self._layout = trainer.layout
        num = len(self.names)
        self._tokens = torch.zeros(num, dtype=torch.float64, device=trainer.layout.device)
        self._sums = torch.zeros(num, 2, dtype=torch.float64, device=trainer.layout.device)
        if trainer.state.step > 0 and not self._loaded and trainer.layout.is_logging_rank:
            log.warning("DatasetLossMonitor: resumed at step %d without saved per-dataset token "
                        "counts; 2_datasets/tokens/* count from this step on", trainer.state.step)
        dropped = sorted(set(self._base) - set(self.names))
        if dropped and trainer.layout.is_logging_rank:
            log.warning("DatasetLossMonitor: saved token counts of datasets no longer in the "
                        "blend are dropped: %s", ", ".join(dropped))

    def on_step_end(self, trainer, metrics: StepMetrics) -> None:
        layout = trainer.layout
        if self._tokens is None or not layout.is_last_stage:
            return
        report = trainer.batch_report
        if report and "dataset_id" not in report:
            if not self._warned_ids and layout.is_logging_rank:
                log.warning("DatasetLossMonitor: the batches carry no dataset_id; nothing to log")
            self._warned_ids = True
            return
        # Every step, logged or not, on the device: no host copy until a write.
        step_sums = per_dataset_sums(report, len(self.names), layout.device)
        self._sums += step_sums
        self._tokens += step_sums[:, 1]
        if not trainer.metrics.due(self.interval, self.log_last_step):
            return
        vector = torch.cat([self._sums.reshape(-1), self._tokens])
        self._sums.zero_()
        if layout.dp_size > 1:
            dist.all_reduce(vector, group=layout.dp_group)
        if not layout.is_logging_rank:
            return
        num = len(self.names)
        values = vector.tolist()
        sums = [values[2 * i:2 * i + 2] for i in range(num)]
        self.last = dataset_tags(self.names, sums, self._with_base(values[2 * num:]))
        trainer.metrics.record_many(self.last)
