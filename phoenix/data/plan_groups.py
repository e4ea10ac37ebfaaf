"""Whole groups in the data plan: group boundaries from ``group_ids``, their digest (the
plan's fingerprint holds it), and the checks that a stage can keep its groups whole.

``group_ids`` hold one id per sample, each group contiguous. With ``pack_groups`` (see
:mod:`phoenix.data.samples`) they are ids of the packed units, which the plan keeps
whole as it keeps a group.
"""

from __future__ import annotations

import hashlib
import logging
import math
from fractions import Fraction

import numpy as np

from phoenix.data.native import group_runs
from phoenix.data.plan_checks import input_error
from phoenix.data.plan_counts import Shares, fit_limit

log = logging.getLogger("phoenix.data.plan")   # the plan's one log, whichever part speaks


def groups_digest(group_ids) -> str:
    """sha256 of the group boundaries of ``group_ids`` (what a plan depends on)."""
    return digest_of_starts(group_runs(np.asarray(group_ids))[0])


def digest_of_starts(starts: np.ndarray) -> str:
    """sha256 of group boundaries (the start of every group plus the sample count)."""
    return hashlib.sha256(memoryview(np.ascontiguousarray(starts, dtype="<i8")).cast("B")).hexdigest()


def check_groups(datasets, shares: Shares, num_batches: int, fixed: np.ndarray
                 ) -> list[np.ndarray | None]:
    """The start of every group plus ``num_samples`` (int64, G+1) of each grouped dataset
    (None for the others), checked against the stage: ``shares`` and ``fixed`` (the
    caller-given counts of the first batches) of ``num_batches`` batches.

    Raises ValueError when ``group_ids`` are malformed, when the exact packer gets a
    group larger than the stage takes from its dataset, or when a ``pack_groups`` unit
    may not fit a batch; logs when the flexible datasets may lack room."""
    planned_batches = num_batches - len(fixed)
    group_starts: list[np.ndarray | None] = []
    for i, d in enumerate(datasets):
        if d.group_mode != "batch":
            group_starts.append(None)
            continue
        starts = _group_starts(d)
        expected = shares.planned(i, planned_batches) + int(fixed[:, i].sum())
        biggest = int(np.diff(starts).max()) if len(starts) > 1 else 0
        # A flexible dataset's large group spans batches and may end the stage part-way
        # (the next stage, or a resume, continues it); the exact packer cannot.
        if (shares.weights[i] > 0 or fixed[:, i].any()) and num_batches > 0 and biggest > expected \
                and i not in shares.flexible:
            raise input_error(d, "group_ids", f"a group of {biggest} samples is larger than the "
                              f"{expected} samples this stage takes from the dataset")
        group_starts.append(starts)
    if shares.flexible:
        _check_room(datasets, shares, group_starts)
    _check_units_fit(datasets, shares)
    return group_starts


def _group_starts(d) -> np.ndarray:
    """Start of every group plus ``num_samples`` (int64, G+1), validating ``group_ids``."""
    ids = np.asarray(d.group_ids)
    if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
        raise input_error(d, "group_ids", f"must be a 1-D integer array, got dtype {ids.dtype} ndim {ids.ndim}")
    if len(ids) != d.num_samples:
        raise input_error(d, "group_ids", f"length {len(ids)} != num_samples {d.num_samples}")
    starts, increasing = group_runs(ids)
    # Increasing run ids are contiguous groups; otherwise look for an id that repeats.
    if not increasing and len(np.unique(ids[starts[:-1]])) != len(starts) - 1:
        raise input_error(d, "group_ids", "groups are not contiguous (a group id reappears after another group)")
    return starts


def _check_room(ds, shares: Shares, group_starts) -> None:
    """Log when the flexible datasets may lack room for their whole groups: the prefix
    bound needs ``sum_g (v_g * F + S_g) <= F`` for every batch's free slots ``F`` (``v_g``
    share of the free slots, ``S_g`` the largest group <= ceil(v_g * B)); checked at the
    fewest free slots, ``B - sum of burst sizes``."""
    w, B = shares.weights, shares.global_batch_size
    w_free = sum(w[i] for i in range(len(ds)) if not shares.burst[i])
    f_min = shares.fewest_free
    need = Fraction(0)
    for i in shares.flexible:
        v = w[i] / w_free
        sizes = np.diff(group_starts[i])
        fit = sizes[sizes <= math.ceil(v * B)]
        need += v * f_min + max(1, int(fit.max()) if len(fit) else 1)
    if need > f_min:
        log.warning("data plan: grouped datasets %s take too large a share of the batch for "
                    "their whole groups and their mixture bound together (need %.1f of %d free "
                    "slots): fitting groups stay whole, the grouped datasets' prefix error may "
                    "exceed half their largest group", [ds[i].name for i in shares.flexible],
                    float(need), f_min)


def _check_units_fit(ds, shares: Shares) -> None:
    """A ``pack_groups`` unit joins several groups: it must fit every batch (size <= the
    fit limit, smallest at the fewest free slots; a burst's size), or the plan could
    split it across batches and with it a group that fits."""
    f_min = shares.fewest_free
    for i, d in enumerate(ds):
        p = int(d.pack_groups)
        if not p or d.group_mode != "batch" or d.weight == 0:
            continue
        fit = shares.size[i] if shares.burst[i] else fit_limit(shares.quota[i], f_min)
        if p > fit:
            raise input_error(d, "pack_groups", f"units of up to {p} samples may not fit a "
                              f"batch: the smallest count this stage keeps whole is {fit} samples "
                              f"(the dataset's share of the {f_min} slots left by bursts); set "
                              f"pack_groups <= {fit}" + ("" if fit else " or 0"))
        if shares.burst[i] or shares.kind[i] != 2:
            log.warning("data plan: dataset %r: pack_groups with the exact packer (a mixture "
                        "warmup, a burst, or no ungrouped dataset to absorb its count): a unit "
                        "that fits may still be split, more often than a single group; "
                        "phoenix build-plan counts them", d.name)
