"""Per-dataset loss and tokens of the blend, in TensorBoard.

Every ``interval`` steps (and the run's last step) :class:`DatasetLossMonitor` writes,
for each dataset of ``data.datasets`` (named by ``display_name``; ``dataset_id`` is the
index in that list):

``loss/by_dataset/<name>``
    Token-weighted mean loss of that dataset's samples in this step's **global** batch:
    ``sum(loss sums) / sum(loss tokens)`` over its samples on every data-parallel rank.
    Datasets with no loss-bearing token in the batch are not written that step (no fake
    zeros). The token-weighted mean of these values over datasets is ``train/loss``.
``tokens/by_dataset/<name>``
    Loss-bearing tokens (the ``loss_mask`` sum, the unit of ``train/consumed_tokens``)
    of that dataset trained on so far, this step included; written for every dataset
    (0 for one not seen yet is a true count). Skipped steps count: their batch is
    consumed.

Where the numbers come from: after forward-backward ``trainer.batch_report`` holds this
rank's per-sample ``(loss sum, loss tokens)`` and ``dataset_id`` (last pipeline stage
only). Each last-stage rank sums them per dataset; on logging steps one
``all_reduce(SUM)`` over the layout's ``dp_group`` (megatron's data-parallel group)
makes them global (the TP ranks of a stage hold identical reports, so TP is not
reduced). The values are recorded into the step's metrics collector on the logging
rank (see :mod:`phoenix.monitor.base`), which the TensorBoard sink writes. The
cumulative token counts are added up locally at **every** step and reduced only when
written.

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

log = logging.getLogger(__name__)


def per_dataset_sums(report: dict, num_datasets: int) -> torch.Tensor:
    """``[num_datasets, 2]`` float64 (loss sum, loss tokens) of a ``batch_report``."""
    out = torch.zeros(num_datasets, 2, dtype=torch.float64)
    if report and len(report["per_sample"]):
        ids = report["dataset_id"].reshape(-1).long().cpu()
        if int(ids.min()) < 0 or int(ids.max()) >= num_datasets:
            raise ValueError(f"DatasetLossMonitor: dataset_id {ids.tolist()} outside "
                             f"[0, {num_datasets}) (data.datasets has {num_datasets})")
        out.index_add_(0, ids, report["per_sample"].detach().double().cpu())
    return out


def dataset_tags(names: list[str], step_sums: torch.Tensor, cumulative: torch.Tensor) -> dict:
    """TensorBoard ``{tag: value}`` from global per-dataset step sums and token counts."""
    tags = {}
    for name, (loss_sum, tokens) in zip(names, step_sums.tolist()):
        if tokens > 0:
            tags[f"loss/by_dataset/{name}"] = loss_sum / tokens
    for name, tokens in zip(names, cumulative.tolist()):
        tags[f"tokens/by_dataset/{name}"] = tokens
    return tags


class DatasetLossMonitor(Callback):
    """Writes ``loss/by_dataset/<name>`` and ``tokens/by_dataset/<name>`` (module docstring).

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
        self._local = None  # this rank's per-dataset tokens since then, float64 [D]
        self._layout = None
        self._loaded = False
        self._warned_ids = False

    # -- state --------------------------------------------------------------------
    def _base_vector(self) -> torch.Tensor:
        return torch.tensor([float(self._base.get(n, 0.0)) for n in self.names], dtype=torch.float64)

    def _global_local(self) -> torch.Tensor:
        """Sum over DP of this process's local counts (last stage; collective there)."""
        local = self._local.clone()
        if self._layout.dp_size > 1:
            local = local.to(self._layout.device)
            dist.all_reduce(local, group=self._layout.dp_group)
        return local.cpu()

    def state_dict(self) -> dict:
        """``{"tokens": {name: count}}``, global; collective (call on every rank)."""
        if self._layout is None or self._local is None:  # not started: what was loaded
            return {"tokens": {k: int(v) for k, v in self._base.items()}}
        layout = self._layout
        counts = torch.zeros(len(self.names), dtype=torch.float64)
        if layout.is_last_stage:
            counts = self._global_local()
        if layout.world_size > 1:  # the last rank is on the last stage
            counts = counts.to(layout.device)
            dist.broadcast(counts, src=layout.world_size - 1)
            counts = counts.cpu()
        counts += self._base_vector()
        return {"tokens": {name: int(v) for name, v in zip(self.names, counts.tolist())}}

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
        self._local = torch.zeros(len(self.names), dtype=torch.float64)
        if trainer.state.step > 0 and not self._loaded and trainer.layout.is_logging_rank:
            log.warning("DatasetLossMonitor: resumed at step %d without saved per-dataset token "
                        "counts; tokens/by_dataset/* count from this step on", trainer.state.step)
        dropped = sorted(set(self._base) - set(self.names))
        if dropped and trainer.layout.is_logging_rank:
            log.warning("DatasetLossMonitor: saved token counts of datasets no longer in the "
                        "blend are dropped: %s", ", ".join(dropped))

    def on_step_end(self, trainer, metrics: StepMetrics) -> None:
        layout = trainer.layout
        if self._local is None or not layout.is_last_stage:
            return
        report = trainer.batch_report
        if report and "dataset_id" not in report:
            if not self._warned_ids and layout.is_logging_rank:
                log.warning("DatasetLossMonitor: the batches carry no dataset_id; nothing to log")
            self._warned_ids = True
            return
        step_sums = per_dataset_sums(report, len(self.names))
        self._local += step_sums[:, 1]  # every step, logged or not
        if not trainer.metrics.due(self.interval, self.log_last_step):
            return
        vector = torch.cat([step_sums.reshape(-1), self._local])
        if layout.dp_size > 1:
            vector = vector.to(layout.device)
            dist.all_reduce(vector, group=layout.dp_group)
            vector = vector.cpu()
        if not layout.is_logging_rank:
            return
        num = len(self.names)
        global_sums = vector[:2 * num].reshape(num, 2)
        cumulative = vector[2 * num:] + self._base_vector()
        self.last = dataset_tags(self.names, global_sums, cumulative)
        trainer.metrics.record_many(self.last)
