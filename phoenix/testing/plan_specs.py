"""Data-plan inputs straight from prefixes, without a run config (tests and benchmarks).

A run gets its plan inputs from the stage table (:mod:`phoenix.data.stage_plans`); these
helpers build one stage's :class:`~phoenix.data.plan.PlanInputs` from a list of
:class:`PlanDatasetSpec` instead.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from phoenix.data.plan import PlanDataset, PlanInputs
from phoenix.data.sample_cache import cached_sample_index
from phoenix.data.samples import SampleIndex


@dataclass(frozen=True)
class PlanDatasetSpec:
    """What the plan needs to know about one dataset of the run (from the data config)."""

    name: str
    prefix: str
    weight: float
    min_share: float = 0.0
    group_mode: str = "none"
    pack_groups: int = 0
    """Group packing of a grouped dataset (``DatasetEntry.pack_groups``; 0: off)."""


def plan_inputs(specs: list[PlanDatasetSpec], indices: list[SampleIndex], global_batch_size: int,
                num_batches: int, seed: int, start_offsets: list[int] | None = None) -> PlanInputs:
    datasets = [PlanDataset(name=s.name, num_samples=len(ix), weight=s.weight, min_share=s.min_share,
                            group_mode=s.group_mode,
                            group_ids=ix.group_ids if s.group_mode == "batch" else None,
                            pack_groups=ix.pack_groups, groups_digest=ix.groups_digest)
                for s, ix in zip(specs, indices)]
    return PlanInputs(datasets=datasets, global_batch_size=global_batch_size,
                      num_batches=num_batches, seed=seed, start_offsets=start_offsets)


def build_indices(specs: list[PlanDatasetSpec], seq_length: int,
                  cache_dir: str | Path | None = None) -> list[SampleIndex]:
    """The sample index of every dataset; with ``cache_dir``, cached there and
    memory-mapped (:func:`phoenix.data.sample_cache.cached_sample_index`)."""
    return [cached_sample_index(s.prefix, seq_length, use_groups=s.group_mode == "batch",
                                cache_dir=cache_dir, pack_groups=s.pack_groups)
            for s in specs]
