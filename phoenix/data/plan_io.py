"""Data plans on disk: a directory of ``.npy`` files, memory-mapped by every rank.

A plan of ``N`` samples holds 10 bytes per sample (``dataset_ids`` uint16,
``sample_ids`` int64): 5 GB for 500M samples. Loaded whole, every rank of a node would
hold its own copy; memory-mapped read-only, the pages a rank reads come from the page
cache, shared by all ranks of the node, and only the batches a rank reaches are read.

Layout of ``plan-<fingerprint>/``: ``meta.json`` (format, fingerprint, names, sizes)
and one ``<field>.npy`` per array field of :class:`~phoenix.data.plan.DataPlan`. The
directory is written under a temporary name and renamed into place whole
(:func:`phoenix.io.publish_dir`), so a reader sees no plan or all of it, and two jobs
building the same plan at once publish one copy (the plan is deterministic).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from phoenix.data.plan import FORMAT_VERSION, DataPlan
from phoenix.io import publish_dir

ARRAYS = ("weights", "num_samples", "burst", "dataset_ids", "sample_ids", "counts",
          "start_offsets", "end_offsets", "epochs", "groups_split", "groups_total", "groups_fit",
          "groups_fit_split", "flexible")
MAPPED = ("dataset_ids", "sample_ids", "counts")
"""Arrays that grow with the plan (memory-mapped); the per-dataset ones are read whole."""


def save_plan(plan: DataPlan, path: str | os.PathLike) -> bool:
    """Publish ``plan`` as the directory ``path``. False when another process published
    it first (its copy is kept: a plan with the same fingerprint is the same plan)."""
    meta = dict(format=FORMAT_VERSION, fingerprint=plan.fingerprint, names=plan.names,
                global_batch_size=plan.global_batch_size, num_batches=plan.num_batches,
                violations=plan.violations, allocator=plan.allocator)

    def write(directory: Path) -> None:
        for name in ARRAYS:
            np.save(directory / f"{name}.npy", np.ascontiguousarray(getattr(plan, name)))
        (directory / "meta.json").write_text(json.dumps(meta, indent=1))

    return publish_dir(path, write)


def plan_exists(path: str | os.PathLike) -> bool:
    return (Path(path) / "meta.json").is_file()


def load_plan(path: str | os.PathLike, expected_fingerprint: str) -> DataPlan:
    """Load a plan written by :func:`save_plan`, its per-sample and per-batch arrays
    memory-mapped read-only; raise ValueError if it was built from other inputs
    (fingerprint mismatch) or by another format version."""
    path = Path(path)
    meta = json.loads((path / "meta.json").read_text())
    if meta.get("format") != FORMAT_VERSION:
        raise ValueError(f"plan {path}: format {meta.get('format')} != {FORMAT_VERSION}; rebuild it")
    if meta["fingerprint"] != expected_fingerprint:
        raise ValueError(f"plan {path} was built from different inputs: fingerprint "
                         f"{meta['fingerprint']} != expected {expected_fingerprint}; rebuild it")
    arrays = {k: np.load(path / f"{k}.npy", mmap_mode="r" if k in MAPPED else None,
                         allow_pickle=False) for k in ARRAYS}
    return DataPlan(names=meta["names"], global_batch_size=meta["global_batch_size"],
                    num_batches=meta["num_batches"], violations=meta["violations"],
                    allocator=meta["allocator"], fingerprint=meta["fingerprint"], **arrays)
