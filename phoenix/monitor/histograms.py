"""Weight and gradient histograms in TensorBoard, over the full (unsharded) tensors.

Every ``interval`` optimizer steps (``logging.histograms``) :class:`HistogramMonitor`
records, for every part key the patterns select (the keys of the per-layer norms,
phoenix.monitor.norms: ``embedding``, ``layer_07/mlp/fc1``, ...):

``param_hist/<key>``
    The part's weights the step's gradients were computed at (before this step's
    update; the optimizer's fp32 main copy when it keeps one), like ``param_norm/``.
``grad_hist/<key>``
    Its gradients as the optimizer is about to use them: reduced over data parallel,
    scaled by 1/tokens, fp16 loss scale removed, **before** clipping, like ``grad_norm/``.

One histogram per key holds every weight of the part (e.g. a weight and its bias).
The step is the one ``1_train/loss`` uses (steps completed after the step).

No rank ever holds a whole tensor: the buckets are agreed on first, then counted where
the elements live. Each rank takes the elements it *owns*
(:func:`phoenix.monitor.ownership.owned_slices`: TP shards, pipeline stages, the
distributed optimizer's DP shards and expert-parallel experts, TP-duplicated weights
once, a tied embedding's second copy skipped), so that a sum over the world sees every
element exactly once. Then:

1. one ``all_reduce(MAX)`` of every histogram's local ``max`` and ``-min`` gives the
   global range, copied to the host (``bins`` equal-width buckets between them);
2. every rank counts its elements with ``torch.histc`` on those edges and adds their
   number, sum and sum of squares; one ``all_reduce(SUM)`` (float64) adds them up.

The logging rank records :class:`phoenix.monitor.base.Histogram` objects, which the
TensorBoard sink writes with ``add_histogram_raw`` (and W&B as ``np_histogram``). A part
whose elements are all equal (e.g. norm weights at initialisation) is one bucket.

Nothing is done outside logging steps; on logging steps the monitor only reads weights
and gradients, so it cannot change training.
"""

from __future__ import annotations

import fnmatch
import re

import torch
import torch.distributed as dist

from phoenix.config.typed import ConfigError
from phoenix.monitor.base import Histogram
from phoenix.monitor.norms import PartMonitor
from phoenix.monitor.ownership import loss_scale, owned_slices

FAMILIES = ("param_hist", "grad_hist")


def describe_keys(keys: list[str]) -> str:
    """``keys`` in short: layer and expert numbers folded into ``*`` with their range,
    e.g. ``embedding, layer_*/mlp/fc1, output_layer (layer_* = layer_00..layer_31)``."""
    shapes, ranges = [], {}
    for key in keys:
        shape = key
        for word in ("layer", "expert"):
            found = re.findall(rf"\b{word}_(\d+)\b", key)
            if found:
                ranges.setdefault(word, set()).update(found)
                shape = re.sub(rf"\b{word}_\d+\b", f"{word}_*", shape)
        if shape not in shapes:
            shapes.append(shape)
    folded = [f"{w}_* = {w}_{min(ids)}..{w}_{max(ids)}" for w, ids in ranges.items()]
    return ", ".join(shapes) + (f" ({'; '.join(folded)})" if folded else "")


def select_keys(patterns: list[str], keys: list[str]) -> list[str]:
    """The keys (in ``keys``' order) that one of ``patterns`` matches (fnmatch, case
    sensitive; ``*`` also crosses ``/``). ConfigError naming the known keys when a
    pattern matches none."""
    for pattern in patterns:
        if not any(fnmatch.fnmatchcase(k, pattern) for k in keys):
            raise ConfigError(f"logging.histograms.patterns: {pattern!r} matches no part of "
                              f"the model; its keys: {describe_keys(keys)}")
    return [k for k in keys if any(fnmatch.fnmatchcase(k, p) for p in patterns)]


def bucket_limits(lo: float, hi: float, bins: int) -> list[float]:
    """The right edges of ``bins`` equal-width buckets from ``lo`` to ``hi`` (the last
    is ``hi`` exactly), as ``torch.histc(..., bins, lo, hi)`` counts them."""
    width = (hi - lo) / bins
    return [lo + width * (i + 1) for i in range(bins - 1)] + [hi]


def histogram_from_stats(lo: float, hi: float, num: float, total: float, squares: float,
                         counts: list[float], scale: float = 1.0) -> Histogram:
    """A :class:`Histogram` of values counted on the edges ``lo..hi`` (``counts``: one per
    bucket), divided by ``scale`` (fp16 gradients: the loss scale); a part whose values
    are all equal (``lo == hi``) is one bucket."""
    lo, hi, total, squares = lo / scale, hi / scale, total / scale, squares / (scale * scale)
    if hi > lo:
        limits, counts = bucket_limits(lo, hi, len(counts)), list(counts)
    else:
        limits, counts = [hi], [num]
    return Histogram(min=lo, max=hi, num=num, sum=total, sum_squares=squares,
                     bucket_limits=tuple(limits), bucket_counts=tuple(counts))


class HistogramMonitor(PartMonitor):
    """Records ``param_hist/<key>`` and ``grad_hist/<key>`` for the keys ``patterns``
    select, every ``interval`` steps (the last step of the run included), into
    ``trainer.metrics`` on the logging rank before the optimizer step. All ranks must
    have the monitor (its reductions are collective). After a logged step, ``last``
    holds ``{tag: Histogram}`` on the logging rank."""

    priority = 590

    def __init__(self, interval: int, patterns: list[str], bins: int = 64,
                 log_last_step: bool = True):
        if interval < 0 or bins < 1:
            raise ValueError(f"HistogramMonitor: interval >= 0 and bins >= 1, got "
                             f"{interval}, {bins}")
        super().__init__(interval, log_last_step)
        self.patterns, self.bins = list(patterns), bins

    def select(self, keys: list[str]) -> list[str]:
        # Every rank sees all keys, so a pattern matching none is refused on every rank.
        return select_keys(self.patterns, keys)

    def on_before_optimizer_step(self, trainer) -> None:
        if not self.due(trainer):
            return
        with torch.no_grad():
            lo, hi, stats = self._reduce(trainer)
        if trainer.layout.is_logging_rank:
            self.last = self._histograms(lo, hi, stats.cpu().tolist(), loss_scale(trainer))
            for tag, hist in self.last.items():
                trainer.metrics.record_histogram(tag, hist)

    def _reduce(self, trainer):
        """``(lo, hi, stats)``: per histogram (weights of every key, then gradients) the
        global min and max (host lists), and ``[num, sum, sum of squares, counts...]``
        summed over the world (a float64 device tensor ``[2 * keys, 3 + bins]``).
        Collective."""
        device, k, bins = trainer.layout.device, len(self.keys), self.bins
        owned = owned_slices(trainer, self._entries)
        # (histogram index, 1-D tensor): weights are histograms 0..k-1, gradients k..2k-1.
        parts = [(self._index[o.key], o.weight) for o in owned] + \
                [(k + self._index[o.key], o.grad) for o in owned]
        parts = [(h, t) for h, t in parts if t.numel()]
        extremes = torch.full((2, 2 * k), float("-inf"), dtype=torch.float64, device=device)
        if parts:
            index = torch.tensor([h for h, _ in parts], dtype=torch.long, device=device)
            highs = torch.stack([t.max() for _, t in parts]).double()
            lows = torch.stack([-t.min() for _, t in parts]).double()
            extremes[0].scatter_reduce_(0, index, highs, "amax")
            extremes[1].scatter_reduce_(0, index, lows, "amax")
        dist.all_reduce(extremes, op=dist.ReduceOp.MAX)  # the whole world: TP x PP x DP x EP
        hi, lo = extremes[0].tolist(), (-extremes[1]).tolist()  # the one host copy of the edges
        stats = torch.zeros(2 * k, 3 + bins, dtype=torch.float64, device=device)
        for h, t in parts:
            values = t if t.dtype == torch.float32 else t.float()
            stats[h, 0] += values.numel()
            stats[h, 1] += values.sum(dtype=torch.float64)
            stats[h, 2] += torch.linalg.vector_norm(values, dtype=torch.float32).double() ** 2
            if hi[h] > lo[h]:  # histc counts values == hi into the last bucket
                stats[h, 3:] += torch.histc(values, bins, lo[h], hi[h]).double()
            else:
                stats[h, 3] += values.numel()
        dist.all_reduce(stats, op=dist.ReduceOp.SUM)
        return lo, hi, stats

    def _histograms(self, lo, hi, stats, scale: float) -> dict[str, Histogram]:
        """The tags of the reduced ``stats``; gradients divided by the fp16 loss scale."""
        out = {}
        families = (("param_hist", 0, 1.0), ("grad_hist", len(self.keys), scale))
        for family, offset, divide in families:
            for i, key in enumerate(self.keys):
                h = offset + i
                num, total, squares, *counts = stats[h]
                if num == 0:  # no element had a gradient (a frozen part)
                    continue
                out[f"{family}/{key}"] = histogram_from_stats(lo[h], hi[h], num, total, squares,
                                                              counts, divide)
        return out
