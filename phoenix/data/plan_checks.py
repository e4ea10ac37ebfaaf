"""Input checks of the data plan (phoenix.data.plan): every error names the dataset and
the field; the soft conditions (room for flexible whole groups, tail packing with the
exact packer) are logged."""

from __future__ import annotations

import logging
import math
from fractions import Fraction

import numpy as np

log = logging.getLogger("phoenix.data.plan")
MAX_NUM_SAMPLES = 1 << 40
GROUP_MODES = ("none", "batch")


def _err(d, fieldname: str, msg: str) -> ValueError:
    where = f"dataset {d.name!r}: " if d is not None else ""
    return ValueError(f"{where}{fieldname}: {msg}")


def _check_dataset(d) -> None:
    if not isinstance(d.name, str) or not d.name:
        raise _err(None, "name", f"every dataset needs a non-empty name, got {d.name!r}")
    if int(d.num_samples) != d.num_samples or not 0 <= d.num_samples < MAX_NUM_SAMPLES:
        raise _err(d, "num_samples", f"must be an integer in [0, 2**40), got {d.num_samples!r}")
    if not math.isfinite(d.weight) or d.weight < 0:
        raise _err(d, "weight", f"must be finite and >= 0, got {d.weight!r}")
    if d.weight > 0 and d.num_samples == 0:
        raise _err(d, "num_samples", "is 0 but weight is positive")
    if not (math.isfinite(d.min_share) and 0 <= d.min_share < 1):
        raise _err(d, "min_share", f"must be in [0, 1) (0 = off), got {d.min_share!r}")
    if d.group_mode not in GROUP_MODES:
        raise _err(d, "group_mode", f"must be one of {GROUP_MODES}, got {d.group_mode!r}")
    if d.group_mode == "batch" and d.group_ids is None:
        raise _err(d, "group_ids", "group_mode='batch' needs group_ids")


def _check_slack(ds, w, flexible, burst, size, B, group_starts) -> None:
    """Log when the flexible datasets may lack room for their whole groups: the prefix
    bound needs ``sum_g (v_g * F + S_g) <= F`` for every batch's free slots ``F`` (``v_g``
    share of the free slots, ``S_g`` the largest group <= ceil(v_g * B)); checked at the
    fewest free slots, ``B - sum of burst sizes``."""
    w_free = sum(w[i] for i in range(len(ds)) if not burst[i])
    f_min = B - sum(size)
    need = Fraction(0)
    for i in flexible:
        v = w[i] / w_free
        sizes = np.diff(group_starts[i])
        fit = sizes[sizes <= math.ceil(v * B)]
        need += v * f_min + max(1, int(fit.max()) if len(fit) else 1)
    if need > f_min:
        log.warning("data plan: grouped datasets %s take too large a share of the batch for "
                    "their whole groups and their mixture bound together (need %.1f of %d free "
                    "slots): fitting groups stay whole, the grouped datasets' prefix error may "
                    "exceed half their largest group", [ds[i].name for i in flexible],
                    float(need), f_min)


def _check_pack_groups(ds, burst, kind, quota, size, f_min: int, q_bits: int) -> None:
    """A unit of tail packing joins several groups: it must fit every batch (size <= the
    fit limit, smallest at the fewest free slots ``f_min``; a burst's size), or the plan
    could split it across batches and with it a group that fits. ``quota``: shares of
    the free slots in fixed point with ``q_bits`` fraction bits (``fit_limit`` in
    ``csrc/data_plan.h``)."""
    for i, d in enumerate(ds):
        p = int(d.pack_groups)
        if not p or d.group_mode != "batch" or d.weight == 0:
            continue
        fit = (size[i] if burst[i]
               else max(0, (int(quota[i]) * f_min - f_min + (1 << q_bits) - 1) >> q_bits))
        if p > fit:
            raise _err(d, "pack_groups", f"units of up to {p} samples may not fit a "
                       f"batch: the smallest count this stage keeps whole is {fit} samples "
                       f"(the dataset's share of the {f_min} slots left by bursts); set "
                       f"pack_groups <= {fit}" + ("" if fit else " or 0"))
        if burst[i] or kind[i] != 2:
            log.warning("data plan: dataset %r: pack_groups with the exact packer (a mixture "
                        "warmup, a burst, or no ungrouped dataset to absorb its count): a unit "
                        "that fits may still be split, more often than a single group; "
                        "phoenix build-plan counts them", d.name)


def _check_fixed_counts(fixed, D: int, B: int, K: int) -> np.ndarray:
    if fixed is None:
        return np.zeros((0, D), dtype=np.int32)
    fixed = np.asarray(fixed)
    if fixed.ndim != 2 or fixed.shape[1] != D or not np.issubdtype(fixed.dtype, np.integer):
        raise _err(None, "fixed_counts", f"must be an integer array of shape (K0, {D}), got "
                   f"{fixed.dtype} {fixed.shape}")
    if len(fixed) > K:
        raise _err(None, "fixed_counts", f"{len(fixed)} rows but the stage has {K} batches")
    if (fixed < 0).any():
        raise _err(None, "fixed_counts", "counts must be >= 0")
    bad = np.flatnonzero(fixed.sum(axis=1) != B)
    if len(bad):
        raise _err(None, "fixed_counts", f"row {bad[0]} sums to {fixed[bad[0]].sum()}, not B={B}")
    return np.ascontiguousarray(fixed, dtype=np.int32)
