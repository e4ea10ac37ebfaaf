"""Training samples in the order of phoenix's data plan (the default sample source).

For every dataset of the run a :class:`SampleIndex` cuts its token stream into samples
(at group boundaries when the dataset is grouped). The plan then says, for every global
batch, which (dataset, sample) pairs it holds; it is built once and cached on disk under
a fingerprint of all its inputs, so a restart or another parallel layout loads the same
plan (``phoenix build-plan`` builds it ahead of the job).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np

from phoenix.data.plan import DataPlan, PlanInputs, build_plan, plan_fingerprint
from phoenix.data.plan_io import load_plan, plan_exists, save_plan
from phoenix.data.samples import SampleIndex, SampleReader

log = logging.getLogger(__name__)


def load_or_build_plan(inputs: PlanInputs, cache_dir: str | Path, *, build: bool = True) -> tuple[DataPlan, Path]:
    """The cached plan for ``inputs`` (verified by fingerprint), building it if missing;
    its per-sample arrays are memory-mapped from the cache (``phoenix.data.plan_io``),
    also right after a build, so the builder does not keep its own copy either.

    With ``build=False`` a missing plan is an error (ranks other than the builder).
    """
    cache_dir = Path(cache_dir)
    fingerprint = plan_fingerprint(inputs)
    path = cache_dir / f"plan-{fingerprint[:16]}"
    if plan_exists(path):
        t0 = time.perf_counter()
        plan = load_plan(str(path), fingerprint)
        log.info("data plan: loaded %s (%.1fs)", path, time.perf_counter() - t0)
        return plan, path
    if not build:
        raise FileNotFoundError(f"data plan {path} is missing (it is built by rank 0)")
    cache_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    built = build_plan(inputs)
    published = save_plan(built, path)
    log.info("data plan: built %d batches x %d samples in %.1fs -> %s%s", built.num_batches,
             built.global_batch_size, time.perf_counter() - t0, path,
             "" if published else " (another process published it first)")
    plan = load_plan(path, fingerprint)
    plan.build_seconds = built.build_seconds
    return plan, path


class PlanSource:
    """``sample(i)``: the ``i``-th sample of the run in plan order (``i = k*B + j``).

    ``vocab_size``: every sample's token ids are checked against it (see
    :class:`SampleReader`); None skips the check.
    """

    def __init__(self, plan: DataPlan, indices: list[SampleIndex | None], eod_id: int,
                 vocab_size: int | None = None):
        self.plan = plan
        # None: a dataset the plan never reads (weight 0 in a stage).
        self.readers = [None if ix is None else SampleReader(ix, eod_id, vocab_size, name)
                        for ix, name in zip(indices, plan.names)]

    def __len__(self) -> int:
        return len(self.plan.dataset_ids)

    def sample(self, index: int) -> dict:
        d = int(self.plan.dataset_ids[index])
        item = self.readers[d].read(int(self.plan.sample_ids[index]))
        item["dataset_id"] = d
        return item

    def provenance(self, index: int) -> dict:
        """What :meth:`sample` reports of the sample's origin (``dataset_id``,
        ``sample_id``, ``group_id``, ``document_id``), without reading its tokens."""
        d = int(self.plan.dataset_ids[index])
        return {"dataset_id": d, **self.readers[d].provenance(int(self.plan.sample_ids[index]))}


def loss_bearing_fraction(plan: DataPlan, indices: list[SampleIndex | None]) -> list[float | None]:
    """Per dataset: the fraction of its planned samples' ``seq_length`` label positions
    that carry loss (real tokens; a padded group tail carries none). None: not read."""
    out = []
    for d, ix in enumerate(indices):
        ids = plan.sample_ids[plan.dataset_ids == d]
        if ix is None or len(ids) == 0:
            out.append(None)
            continue
        real = ix.lengths[ids].astype(np.int64) - 1
        out.append(float(real.sum()) / (len(ids) * ix.seq_length))
    return out


def summary_table(plan: DataPlan, indices: list[SampleIndex | None] | None = None) -> str:
    """The plan summary as a fixed-width table (printed by ``phoenix build-plan``).

    ``groups whole/fit``: groups kept whole / groups that fit the batch where they start
    (and, after ``+``, groups split; larger groups span batches by design; ``units``
    with group packing: units of groups, each kept as a group). With the
    sample ``indices``, ``loss tokens``: the fraction of label positions that carry loss
    (:func:`loss_bearing_fraction`; the rest is padding of a group's last sample)."""
    header = ("dataset", "weight", "burst", "samples", "epochs", "batches", "min/b", "max/b",
              "groups whole/fit") + (("loss tokens",) if indices is not None else ())
    loss = loss_bearing_fraction(plan, indices) if indices is not None else None
    rows = [header]
    for d, r in enumerate(plan.summary()):
        # fitting groups kept whole / groups that fit the batch where they start
        groups = f"{r['groups_kept_whole']}/{r['groups_fitting']}" if r["groups_total"] else "-"
        if r["groups_total"] and r["groups_kept_whole"] < r["groups_fitting"]:
            groups += f" ({r['groups_fitting'] - r['groups_kept_whole']} split)"
        if r["groups_total"] and indices is not None and indices[d] is not None \
                and indices[d].pack_groups:  # the plan's groups are units of group packing
            groups += " units"
        rows.append((r["name"], f"{r['weight']:.4f}", "yes" if r["burst"] else "", str(r["samples_used"]),
                     f"{r['epochs_consumed']:.2f}", str(r["batches_present"]), str(r["min_per_batch"]),
                     str(r["max_per_batch"]), groups)
                    + ((("-" if loss[d] is None else f"{loss[d]:.4f}"),) if loss is not None else ()))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
