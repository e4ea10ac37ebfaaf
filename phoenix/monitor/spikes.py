"""Loss / grad-norm spike ("毛刺") detection, with the provenance of the spiking batch.

A step *spikes* on a metric when its value exceeds ``mean + sigma * std`` of that
metric over a trailing window of recent steps (population std of the last ``window``
values), once at least ``min_steps`` values are in the window. Loss and grad norm have
their own thresholds (``loss_sigma``, ``grad_norm_sigma``; ``null`` turns one off).
Values of steps flagged as spikes are kept out of the window by default
(``exclude_spikes``), so one spike does not mask the next; non-finite values (a NaN
loss, the NaN grad norm of a skipped step) are neither flagged nor added.

Each flagged step appends one JSON line to ``<output_dir>/spikes.jsonl`` (flushed at
once), written by the **logging rank** (last pipeline stage, TP rank 0, DP rank 0: the
rank that records the step's metrics, the ``NormMonitor``'s per-layer norms included)::

    {"step": 120, "loss": 9.81, "grad_norm": 14.2, "skipped": true,
     "skip_reason": "loss spike",
     "spikes": {"loss": {"value": 9.81, "mean": 3.02, "std": 0.05, "threshold": 3.27,
                         "sigma": 5.0, "window": 100}},
     "top_layers": [{"name": "layer_07", "grad_norm": 3.1}, ...],   # or null, then
     "top_layers_note": "NormMonitor did not log this step ...",     # says why
     "dataset_counts": {"web": 700, "code": 300},     # samples of the global batch
     "top_samples": [{"dataset": "code", "dataset_id": 1, "sample_id": 4711,
                      "group_id": -1, "document_id": 3120, "loss": 11.2,
                      "loss_sum": 7168.0, "tokens": 640}, ...],
     "time": 1718000000.0}

``loss`` of a sample is its token-mean loss (``loss_sum / tokens``); ``top_samples``
are the ``top_samples`` samples with the highest such loss in the *whole* global batch:
every DP rank's ``trainer.batch_report`` of the last pipeline stage is gathered (over
the layout's ``dp_group``, by TP rank 0 of the last stage only: the other TP ranks
hold identical reports) to the logging rank. ``dataset_counts`` counts the samples of
the global batch per dataset (names as in the data config). ``grad_norm`` is megatron's
global norm before clipping (NaN, written as ``null``, on a skipped step). ``top_layers``
are read from the per-layer grad norms recorded in the step's metrics (by the
``NormMonitor``, on its logging steps, which never include a skipped step).

``skip_step: true`` skips the optimizer update of a step whose **loss** spikes, through
``trainer.request_skip("loss spike")`` in ``on_before_optimizer_step``; the trainer
counts it in ``state.skipped_steps`` and TensorBoard ``1_train/skipped_steps``. The grad
norm is only known after the optimizer step, so grad-norm spikes are logged, never
skipped. ``spikes/count`` (flagged steps so far) is recorded (for TensorBoard) on every
flagged step and every ``logging.log_interval`` steps.

Every rank runs the same detector on the same values (the loss is broadcast to every
rank, megatron's grad norm is reduced over the whole model), so all ranks agree on a
spike without communication; the provenance gather happens on flagged steps only.

Resume: the running windows are not checkpointed; after a resume they restart empty
(no detection for ``min_steps`` steps). ``spikes/count`` continues from the records of
``spikes.jsonl`` up to the resumed step; records of steps after the checkpoint, written
by the interrupted job, stay in the file (a step may then appear twice).
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections import deque
from pathlib import Path

from phoenix.config.monitoring import SpikeConfig
from phoenix.io import read_jsonl
from phoenix.monitor.base import Callback, StepMetrics

log = logging.getLogger(__name__)

METRICS = ("loss", "grad_norm")


class SpikeDetector:
    """Running-window spike test for named metrics; pure Python, no torch.

    ``observe(metric, value)`` returns ``None`` or ``{"value", "mean", "std",
    "threshold", "sigma", "window"}`` when the value spikes, then updates the window.
    """

    def __init__(self, window: int, min_steps: int, sigma: dict[str, float | None],
                 rel_std_floor: float = 0.0, exclude_spikes: bool = True):
        self.window, self.min_steps = window, min_steps
        self.sigma = dict(sigma)
        self.rel_std_floor, self.exclude_spikes = rel_std_floor, exclude_spikes
        self.values: dict[str, deque] = {m: deque(maxlen=window) for m in self.sigma}

    @classmethod
    def from_config(cls, cfg: SpikeConfig) -> "SpikeDetector":
        return cls(cfg.window, cfg.min_steps, {"loss": cfg.loss_sigma,
                                               "grad_norm": cfg.grad_norm_sigma},
                   cfg.rel_std_floor, cfg.exclude_spikes)

    def stats(self, metric: str) -> tuple[float, float, int]:
        """(mean, std, n) of the metric's window (population std)."""
        vals = self.values[metric]
        n = len(vals)
        if n == 0:
            return float("nan"), float("nan"), 0
        mean = math.fsum(vals) / n
        var = math.fsum((v - mean) ** 2 for v in vals) / n
        return mean, math.sqrt(var), n

    def check(self, metric: str, value: float) -> dict | None:
        """The spike verdict for ``value`` against the current window (no update)."""
        sigma = self.sigma.get(metric)
        if sigma is None or value is None or not math.isfinite(value):
            return None
        mean, std, n = self.stats(metric)
        if n < self.min_steps:
            return None
        std_used = max(std, self.rel_std_floor * abs(mean))
        threshold = mean + sigma * std_used
        if value <= threshold:
            return None
        return {"value": float(value), "mean": mean, "std": std, "threshold": threshold,
                "sigma": sigma, "window": n}

    def observe(self, metric: str, value: float) -> dict | None:
        spike = self.check(metric, value)
        if self.sigma.get(metric) is not None and value is not None and math.isfinite(value):
            if spike is None or not self.exclude_spikes:
                self.values[metric].append(float(value))
        return spike


# -- provenance ------------------------------------------------------------------------
def report_rows(report: dict) -> list[dict]:
    """One dict per sample of a ``batch_report`` (numpy/tensors -> Python numbers)."""
    if not report or "per_sample" not in report:
        return []
    per_sample = _to_list(report["per_sample"])
    columns = {k: _to_list(report[k]) for k in ("dataset_id", "sample_id", "group_id",
                                                  "document_id") if k in report}
    rows = []
    for i, (loss_sum, tokens) in enumerate(per_sample):
        row = {k: int(v[i]) for k, v in columns.items()}
        row["loss_sum"], row["tokens"] = float(loss_sum), int(tokens)
        row["loss"] = float(loss_sum) / tokens if tokens else float("nan")
        rows.append(row)
    return rows


def _to_list(x):
    if hasattr(x, "detach"):
        x = x.detach().cpu()
    return x.tolist() if hasattr(x, "tolist") else list(x)


def provenance(rows: list[dict], names: list[str], top: int) -> dict:
    """``dataset_counts`` and ``top_samples`` of the global batch's sample rows."""
    out: dict = {}
    if rows and "dataset_id" in rows[0]:
        counts: dict[str, int] = {}
        for r in rows:
            name = _name(names, r["dataset_id"])
            counts[name] = counts.get(name, 0) + 1
        out["dataset_counts"] = counts
    else:
        out["dataset_counts"] = None
    finite = [r for r in rows if math.isfinite(r["loss"])]
    # Highest loss first; ties broken by (dataset, sample) so every layout lists the same.
    ranked = sorted(finite, key=lambda r: (-r["loss"], r.get("dataset_id", 0), r.get("sample_id", 0)))
    samples = []
    for r in ranked[:top]:
        item = {"dataset": _name(names, r["dataset_id"]) if "dataset_id" in r else None}
        item.update(r)
        samples.append(item)
    out["top_samples"] = samples
    return out


def _name(names: list[str], d: int) -> str:
    return names[d] if 0 <= d < len(names) else str(d)


def top_layers(norm_last: dict[str, float], n: int) -> list[dict]:
    """Whole layers (and embedding / final_norm / output_layer) by grad norm, largest first."""
    items = [(tag.split("/", 1)[1], v) for tag, v in norm_last.items()
             if tag.startswith("grad_norm/") and "/" not in tag.split("/", 1)[1]
             and tag != "grad_norm/global"]
    items.sort(key=lambda kv: (-kv[1], kv[0]))
    return [{"name": k, "grad_norm": v} for k, v in items[:n]]


def _json_number(x):
    return x if x is None or not isinstance(x, float) or math.isfinite(x) else None


def _clean(obj):
    """NaN/Inf -> null, so every line is strict JSON."""
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    return _json_number(obj)


def read_spikes(path: str | Path) -> list[dict]:
    """The records of a ``spikes.jsonl`` (an unfinished last line is ignored)."""
    return read_jsonl(path)


# -- the callback ----------------------------------------------------------------------


class SpikeMonitor(Callback):
    """Flags loss / grad-norm spikes, writes ``spikes.jsonl``, may skip loss spikes.

    All ranks must have it (the provenance gather is collective over the last stage's
    data-parallel group). ``output_dir``: the run directory.
    """

    # After the NormMonitor, whose per-layer grad norms of the step a record lists.
    priority = 300
    state_key = "spikes"

    def __init__(self, cfg: SpikeConfig, output_dir: str | Path,
                 names: list[str] | None = None):
        """``names``: the dataset names by ``dataset_id`` (None: from the trainer's config
        at train start)."""
        self.cfg = cfg
        self.names = list(names) if names is not None else None
        self.path = Path(output_dir) / "spikes.jsonl"
        self.detector = SpikeDetector.from_config(cfg)
        self.count = 0
        self.records: list[dict] = []
        """Records written by this process (logging rank only)."""
        self._loss_spike: tuple[int, dict | None] | None = None
        self._names: list[str] = []
        self._file = None
        self._loaded_windows: dict[str, list[float]] = {}

    # -- state --------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """``{"windows": {metric: [values]}}``: the detector's trailing windows, oldest
        first (the same on every rank: the loss and grad norm it observes are global)."""
        return {"windows": {m: list(v) for m, v in self.detector.values.items()}}

    def load_state_dict(self, state: dict) -> None:
        """Restore the windows of :meth:`state_dict` (before ``on_train_start``): a resumed
        run flags the steps the uninterrupted run flags, from its first step on."""
        self._loaded_windows = {str(m): [float(x) for x in v]
                                for m, v in dict(state.get("windows", {})).items()}

    # -- hooks --------------------------------------------------------------------------
    def on_train_start(self, trainer) -> None:
        self._names = (self.names if self.names is not None
                       else [e.display_name for e in trainer.cfg.data.datasets])
        self.detector = SpikeDetector.from_config(self.cfg)
        for metric, values in self._loaded_windows.items():  # a resume continues the windows
            if metric in self.detector.values:
                self.detector.values[metric].extend(values)
        if trainer.layout.is_logging_rank:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.count = sum(1 for r in read_spikes(self.path)
                             if isinstance(r.get("step"), int) and r["step"] <= trainer.state.step)
            self._file = open(self.path, "a")

    def on_before_optimizer_step(self, trainer) -> None:
        step = trainer.state.step + 1
        spike = self.detector.observe("loss", trainer.loss)
        self._loss_spike = (step, spike)
        if spike is not None and self.cfg.skip_step:
            trainer.request_skip("loss spike")

    def on_step_end(self, trainer, m: StepMetrics) -> None:
        spikes = {}
        if self._loss_spike is not None and self._loss_spike[0] == m.step:
            loss_spike = self._loss_spike[1]
        else:  # on_before_optimizer_step did not run (non-finite loss): nothing to flag
            loss_spike = self.detector.observe("loss", m.loss)
        self._loss_spike = None
        if loss_spike is not None:
            spikes["loss"] = loss_spike
        grad_spike = self.detector.observe("grad_norm", m.grad_norm)
        if grad_spike is not None:
            spikes["grad_norm"] = grad_spike
        if spikes:
            self.count += 1
            self._record(trainer, m, spikes)
        if trainer.layout.is_logging_rank and (spikes or trainer.metrics.due()):
            trainer.metrics.record("spikes/count", self.count)

    def on_train_end(self, trainer) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    # -- record -------------------------------------------------------------------------
    def _record(self, trainer, m: StepMetrics, spikes: dict) -> None:
        rows = self._gather_rows(trainer)
        if not trainer.layout.is_logging_rank:
            return
        record = {"step": m.step, "loss": m.loss, "grad_norm": m.grad_norm,
                  "skipped": m.skipped, "skip_reason": m.skip_reason,
                  "spikes": spikes}
        norms = trainer.metrics.with_prefix("grad_norm/")  # recorded this step, if at all
        if m.skipped or not norms:
            record["top_layers"] = None
            record["top_layers_note"] = (
                "step skipped: NormMonitor does not log skipped steps" if m.skipped else
                "NormMonitor did not log this step (or there is none in this run)")
        else:
            record["top_layers"] = top_layers(norms, self.cfg.top_layers)
            record["grad_norm_global_unclipped"] = norms.get("grad_norm/global")
        record.update(provenance(rows, self._names, self.cfg.top_samples))
        record["time"] = time.time()
        record = _clean(record)
        self.records.append(record)
        if self._file is not None:
            self._file.write(json.dumps(record, ensure_ascii=False) + "\n")
            self._file.flush()
        what = ", ".join(f"{k} {v['value']:.4g} > {v['threshold']:.4g}" for k, v in spikes.items())
        log.warning("spike at step %d: %s%s -> %s", m.step, what,
                    " (update skipped)" if m.skipped else "", self.path)

    def _gather_rows(self, trainer) -> list[dict]:
        """The global batch's sample rows, on the logging rank ([] elsewhere)."""
        import torch.distributed as dist

        layout = trainer.layout
        if not (layout.is_last_stage and layout.tp_rank == 0):
            return []
        rows = report_rows(trainer.batch_report)
        if layout.dp_size == 1:
            return rows
        group = layout.dp_group
        dst = dist.get_global_rank(group, 0)
        gathered = [None] * dist.get_world_size(group) if dist.get_rank() == dst else None
        dist.gather_object(rows, gathered, dst=dst, group=group)
        if not layout.is_logging_rank:
            return []
        return [r for part in gathered for r in part]
