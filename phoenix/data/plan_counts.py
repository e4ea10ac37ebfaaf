"""How many samples of each dataset global batch ``k`` holds.

Every per-batch count of a data plan comes from here or from the C++ code these integers
feed (``allocate``, and ``FlexPacker`` for flexible grouped datasets, in
``csrc/data_plan.h``; the algorithm is documented in :mod:`phoenix.data.plan`, steps 1,
2 and 4):

- :func:`shares`: the weights (the stage table's exact ``Fraction``s, rounded once, in
  :func:`normalised`) to the integers the C++ consumes: a burst dataset's size and rate,
  every other dataset's quota of the free slots (:func:`quotas`, largest remainder), and
  which grouped datasets are flexible. Quotas are in units of ``1/Q``, ``Q = 2**60``.
- :func:`mixture_warmup_counts`: the counts of a mixture warmup's batches, planned here
  and handed to the allocator as ``PlanInputs.fixed_counts``.
- :func:`bursts_in` and :func:`fit_limit`: the C++ formulas for a burst's appearances
  and a dataset's smallest kept-whole count, for the checks in Python.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from fractions import Fraction

import numpy as np

from phoenix.data.plan_checks import input_error

log = logging.getLogger("phoenix.data.plan")   # the plan's one log, whichever part speaks

Q_BITS = 60
Q = 1 << Q_BITS


def quotas(weights: list[Fraction]) -> list[int]:
    """Integer shares summing to exactly Q (largest remainder; ties to the lower index)."""
    total = sum(weights)
    exact = [w * Q / total for w in weights]
    q = [math.floor(x) for x in exact]
    order = sorted(range(len(q)), key=lambda i: (-(exact[i] - q[i]), i))
    for i in order[:Q - sum(q)]:
        q[i] += 1
    return q


def bursts_in(rate: int, k: int) -> int:
    """Appearances of a burst dataset with rate ``rate / Q`` in batches [0, k)."""
    return (Q // 2 + k * rate) >> Q_BITS


def fit_limit(quota: int, free: int) -> int:
    """The smallest per-batch count of a dataset with ``quota`` (of ``free`` slots) that
    the plan keeps whole: ``ceil(quota * free / Q)`` less the quota's rounding
    (``fit_limit`` in ``csrc/data_plan.h``)."""
    return max(0, (int(quota) * free - free + Q - 1) >> Q_BITS)


@dataclass(frozen=True)
class Shares:
    """A stage's mixture as the allocator's exact integers; lists indexed by dataset."""

    global_batch_size: int
    weights: list[Fraction]
    """Normalised (they sum to 1)."""
    burst: list[bool]
    kind: list[int]
    """0: blended by the allocator; 1: burst; 2: flexible whole groups."""
    quota: list[int]
    """Burst: appearance rate; else share of the free slots; both in units of 1/Q."""
    size: list[int]
    """Samples per appearance of a burst dataset (0 for the others)."""
    flexible: list[int]
    """Grouped datasets whose per-batch count follows their groups."""

    @property
    def fewest_free(self) -> int:
        """Free slots of a batch where every burst appears."""
        return self.global_batch_size - sum(self.size)

    def planned(self, i: int, batches: int) -> int:
        """Samples the allocator gives dataset ``i`` in its first ``batches`` batches
        (exactly for a burst, the fluid total rounded down for the others)."""
        if self.burst[i]:
            return self.size[i] * bursts_in(self.quota[i], batches)
        free = self.global_batch_size * batches - sum(
            s * bursts_in(q, batches) for b, q, s in zip(self.burst, self.quota, self.size) if b)
        return (self.quota[i] * free) >> Q_BITS


def normalised(weights) -> list[Fraction]:
    """The weights the quotas come from: each rounded to the nearest float64, then
    normalised exactly to sum to 1 (a note when they did not).

    The rounding is this plan format's definition (``FORMAT_VERSION`` 3), kept so that
    every plan, cached or rebuilt, and every resume of a running job stays bit-identical:
    computed from the stage table's unrounded fractions, the quotas move by a few units
    of ``1/Q`` and PD^2 then breaks some ties the other way (about one plan in five with
    weights that are not dyadic fractions; same guarantees). Doing without it is a plan
    format change. The weights arrive exact; this is the one place they are rounded, and
    the plan's fingerprint holds the rounded values (``float(weight).hex()``)."""
    raw = [Fraction(float(w)) for w in weights]
    total = sum(raw)
    if total == 0:
        raise input_error(None, "weight", "all weights are zero")
    if abs(float(total) - 1.0) > 1e-9:
        log.info("data plan: weights sum to %s, normalising to 1", float(total))
    return [x / total for x in raw]


def shares(datasets, global_batch_size: int, fixed_batches: int) -> Shares:
    """The allocator's integers for ``datasets`` (:class:`phoenix.data.plan.PlanDataset`)
    at batch size ``B``; ``fixed_batches``: leading batches with caller-given counts (no
    flexible groups then). Raises ValueError naming the field when bursts leave no room."""
    ds, B = datasets, global_batch_size
    w = normalised(d.weight for d in ds)
    burst = [0 < w[i] < Fraction(d.min_share) for i, d in enumerate(ds)]
    kind, quota, size = [0] * len(ds), [0] * len(ds), [0] * len(ds)
    for i, d in enumerate(ds):
        if burst[i]:
            kind[i] = 1
            # round half up, as written; at least w*B so that the rate is <= 1
            size[i] = max(math.floor(d.min_share * B + 0.5), math.ceil(w[i] * B))
            if size[i] < 1:
                raise input_error(d, "min_share", f"min_share * B = {d.min_share * B:g} rounds to 0 samples")
            # rate w*B/size from the exact weight: on average w*B samples per batch
            quota[i] = round(w[i] * B / size[i] * Q)
    always = [d.name for i, d in enumerate(ds) if d.min_share > 0 and w[i] >= Fraction(d.min_share)]
    if B < len(always):
        raise input_error(None, "global_batch_size",
                          f"B={B} is smaller than the {len(always)} datasets that must appear in every batch: {always}")
    if sum(size) > B:
        raise input_error(None, "min_share", f"burst sizes sum to {sum(size)} > B={B} (bursts can coincide)")
    blended = [i for i in range(len(ds)) if not burst[i] and w[i] > 0]
    if not blended:
        raise input_error(None, "min_share", "every weighted dataset is a burst; one with weight >= min_share must fill the rest")
    for i, qi in zip(blended, quotas([w[i] for i in blended])):
        quota[i] = qi
    # Flexible whole groups: a grouped dataset's per-batch count follows its groups when
    # another blended dataset absorbs the difference (and no batch has fixed counts).
    absorbers = [i for i in blended if ds[i].group_mode != "batch"]
    flexible = [i for i in blended if ds[i].group_mode == "batch"] if absorbers and not fixed_batches else []
    for i in flexible:
        kind[i] = 2
    if flexible:
        for i, qi in zip(absorbers, quotas([w[i] for i in absorbers])):
            quota[i] = qi
    return Shares(global_batch_size=B, weights=w, burst=burst, kind=kind, quota=quota,
                  size=size, flexible=flexible)


def mixture_warmup_counts(start: list[Fraction], end: list[Fraction], B: int,
                          steps: int) -> np.ndarray:
    """Per-batch counts of a mixture warmup: (steps, D) int32, rows summing to ``B``.

    Batch ``j`` targets the weights ``w_j = (1 - t) * start + t * end`` with
    ``t = (j + 1) / (steps + 1)`` (so every warmup batch lies strictly between the two
    mixtures). Each count is ``floor`` or ``ceil`` of ``B * w_j[d]`` -- exact per batch --
    and the batch's ``B - sum floor`` extra samples go to the datasets furthest behind
    their cumulative target (fractional part plus the lag carried from earlier warmup
    batches; ties to the lower index), so rounding does not favour one dataset over the
    warmup. ``start``/``end`` are normalised weights (each sums to 1).
    """
    D = len(start)
    if len(end) != D or sum(start) != 1 or sum(end) != 1:
        raise ValueError("mixture_warmup_counts: start and end need the same length and must sum to 1")
    counts = np.zeros((steps, D), dtype=np.int32)
    lag = [Fraction(0)] * D  # cumulative target minus cumulative count
    for j in range(steps):
        t = Fraction(j + 1, steps + 1)
        target = [B * ((1 - t) * a + t * b) for a, b in zip(start, end)]
        row = [math.floor(x) for x in target]
        fractional = [d for d in range(D) if target[d] != row[d]]
        fractional.sort(key=lambda d: (-(target[d] - row[d] + lag[d]), d))
        for d in fractional[:B - sum(row)]:
            row[d] += 1
        lag = [lag[d] + target[d] - row[d] for d in range(D)]
        counts[j] = row
    return counts
