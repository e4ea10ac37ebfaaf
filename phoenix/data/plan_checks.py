"""The data plan's input checks (phoenix.data.plan): every field of :class:`PlanInputs`
and of its datasets, before any arithmetic. Every error names the dataset and the field.

The checks that need the stage's counts live with them: bursts that leave no room in
:mod:`phoenix.data.plan_counts`, groups that cannot stay whole in
:mod:`phoenix.data.plan_groups`.
"""

from __future__ import annotations

import math

import numpy as np

MAX_NUM_SAMPLES = 1 << 40
MAX_DATASETS = 65535        # dataset ids are uint16
GROUP_MODES = ("none", "batch")


def input_error(d, fieldname: str, msg: str) -> ValueError:
    """The ValueError of a bad plan input: ``dataset 'name': field: msg`` (``d`` None: a
    field of the stage)."""
    where = f"dataset {d.name!r}: " if d is not None else ""
    return ValueError(f"{where}{fieldname}: {msg}")


def check_inputs(inputs) -> np.ndarray:
    """Check every field of ``inputs`` (:class:`phoenix.data.plan.PlanInputs`); return its
    ``fixed_counts`` as a contiguous int32 (K0, D) array ((0, D) when none).

    Raises ValueError naming the dataset and field for every invalid input."""
    ds = inputs.datasets
    if not ds:
        raise input_error(None, "datasets", "at least one dataset is required")
    if len(ds) > MAX_DATASETS:
        raise input_error(None, "datasets", f"at most 65535 datasets (uint16 ids), got {len(ds)}")
    for d in ds:
        _check_dataset(d)
    names = [d.name for d in ds]
    if len(set(names)) != len(names):
        raise input_error(None, "datasets", f"dataset names must be unique (they key the shuffles): {names}")
    B, K = inputs.global_batch_size, inputs.num_batches
    if int(B) != B or B < 1:
        raise input_error(None, "global_batch_size", f"must be a positive integer, got {B!r}")
    if int(K) != K or K < 0:
        raise input_error(None, "num_batches", f"must be a non-negative integer, got {K!r}")
    if int(inputs.seed) != inputs.seed or not 0 <= inputs.seed < 1 << 64:
        raise input_error(None, "seed", f"must be an integer in [0, 2**64), got {inputs.seed!r}")
    start = list(inputs.start_offsets) if inputs.start_offsets is not None else [0] * len(ds)
    if len(start) != len(ds) or any(int(s) != s or s < 0 for s in start):
        raise input_error(None, "start_offsets", f"need {len(ds)} non-negative integers, got {start!r}")
    fixed = _check_fixed_counts(inputs.fixed_counts, len(ds), B, K)
    for d, taken in zip(ds, fixed.sum(axis=0)):
        if taken and d.num_samples == 0:
            raise input_error(d, "num_samples", "is 0 but fixed_counts take samples from it")
    return fixed


def _check_dataset(d) -> None:
    if not isinstance(d.name, str) or not d.name:
        raise input_error(None, "name", f"every dataset needs a non-empty name, got {d.name!r}")
    if int(d.num_samples) != d.num_samples or not 0 <= d.num_samples < MAX_NUM_SAMPLES:
        raise input_error(d, "num_samples", f"must be an integer in [0, 2**40), got {d.num_samples!r}")
    if not math.isfinite(d.weight) or d.weight < 0:
        raise input_error(d, "weight", f"must be finite and >= 0, got {d.weight!r}")
    if d.weight > 0 and d.num_samples == 0:
        raise input_error(d, "num_samples", "is 0 but weight is positive")
    if not (math.isfinite(d.min_share) and 0 <= d.min_share < 1):
        raise input_error(d, "min_share", f"must be in [0, 1) (0 = off), got {d.min_share!r}")
    if d.group_mode not in GROUP_MODES:
        raise input_error(d, "group_mode", f"must be one of {GROUP_MODES}, got {d.group_mode!r}")
    if d.group_mode == "batch" and d.group_ids is None:
        raise input_error(d, "group_ids", "group_mode='batch' needs group_ids")


def _check_fixed_counts(fixed, D: int, B: int, K: int) -> np.ndarray:
    if fixed is None:
        return np.zeros((0, D), dtype=np.int32)
    fixed = np.asarray(fixed)
    if fixed.ndim != 2 or fixed.shape[1] != D or not np.issubdtype(fixed.dtype, np.integer):
        raise input_error(None, "fixed_counts", f"must be an integer array of shape (K0, {D}), got "
                          f"{fixed.dtype} {fixed.shape}")
    if len(fixed) > K:
        raise input_error(None, "fixed_counts", f"{len(fixed)} rows but the stage has {K} batches")
    if (fixed < 0).any():
        raise input_error(None, "fixed_counts", "counts must be >= 0")
    bad = np.flatnonzero(fixed.sum(axis=1) != B)
    if len(bad):
        raise input_error(None, "fixed_counts", f"row {bad[0]} sums to {fixed[bad[0]].sum()}, not B={B}")
    return np.ascontiguousarray(fixed, dtype=np.int32)
