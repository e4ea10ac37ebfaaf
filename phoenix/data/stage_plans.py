"""One data plan per stage, each continuing every dataset's sample stream.

A dataset's *stream* is its epoch-permuted sample order for one sample index, i.e. for
one ``(seq_length, grouped)`` pair: samples of a different length, or cut at group
boundaries, are different samples. Between stages that read a dataset with the same
pair, the next stage starts exactly at the previous stage's end offset (the data plan
continues the same epochs). When a stage changes a dataset's sequence length or group
mode, the new stream starts at the same *fraction of epochs* already consumed (so the
amount of data read carries over, but which samples of the current epoch repeat is left
to chance); a warning says so.

Every stage plan lists all datasets of ``data.datasets`` in order (unused ones with
weight 0), so dataset ids are the same in every stage. A stage's weights reach the plan
as the stage table's exact fractions (:mod:`phoenix.data.plan_counts` computes the
per-batch counts from them).

The driver gets each plan through a ``get_plan`` callable and knows no rank: which
directory caches the plans and which ranks build or load them is
:mod:`phoenix.data.plan_cache`.
"""

from __future__ import annotations

import bisect
import logging
import math
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Callable, Optional

from phoenix.config.stage_table import ResolvedStage, StageTable
from phoenix.data.data_resume import DataResume
from phoenix.data.plan import DataPlan, PlanDataset, PlanInputs
from phoenix.data.plan_counts import mixture_warmup_counts
from phoenix.data.plan_source import PlanSource
from phoenix.data.sample_cache import cached_sample_index
from phoenix.data.samples import SampleIndex

log = logging.getLogger(__name__)

StreamKey = tuple[int, bool]  # (seq_length, cut at group boundaries)


@dataclass
class StagePlanInputs:
    stage: ResolvedStage
    inputs: PlanInputs
    indices: list[Optional[SampleIndex]]
    """Sample index of every dataset read in the stage (None: not read)."""
    keys: list[Optional[StreamKey]]


def _cut(key: StreamKey) -> str:
    seq, grouped = key
    return f"samples of {seq} tokens" + (" within its groups (group_mode: batch)" if grouped
                                          else "")


class StreamTracker:
    """Where each dataset's stream stands between stages."""

    def __init__(self, names: list[str]):
        self.names = names
        self.offsets: dict[tuple[int, StreamKey], int] = {}
        self.last: dict[int, tuple[StreamKey, int]] = {}   # d -> (key, num_samples)

    def start(self, d: int, key: StreamKey, num_samples: int, stage: str) -> int:
        if d not in self.last:
            return 0
        last_key, last_n = self.last[d]
        offset = self.offsets[(d, last_key)]
        if last_key == key:
            return offset
        start = max(self.offsets.get((d, key), 0), math.ceil(Fraction(offset, last_n) * num_samples))
        log.warning("stage '%s': dataset '%s' is cut into %s, the stage before it into %s, so "
                    "it is read from a new sample order that starts %.1f%% into its epoch, as "
                    "far as it got: samples of this epoch may repeat. To read on without "
                    "repeats, keep its seq_length and group_mode the same in both stages",
                    stage, self.names[d], _cut(key), _cut(last_key), 100 * offset / last_n)
        return start

    def finish(self, d: int, key: StreamKey, num_samples: int, end_offset: int) -> None:
        self.offsets[(d, key)] = int(end_offset)
        self.last[d] = (key, num_samples)


def stage_plans(table: StageTable, prefixes: list[str], seed: int,
                get_plan: Callable[[PlanInputs], DataPlan], resume: Optional[DataResume] = None,
                min_document_tokens: Optional[list[int]] = None,
                pack_groups: Optional[list[int]] = None,
                index_dir: Optional[Path] = None,
                ) -> list[tuple[StagePlanInputs, DataPlan]]:
    """Build (or load, through ``get_plan``) every stage's plan in order; each stage's
    start offsets come from the plans before it, or from ``resume`` (where the streams
    stood at the first stage's start, see phoenix.data.data_resume).
    ``min_document_tokens``: per dataset, the document-length view it reads (0: all).
    ``pack_groups``: per dataset, group packing's unit size when it is read grouped (0: off).
    ``index_dir``: where the sample indices are cached and memory-mapped from
    (:mod:`phoenix.data.sample_cache`); None builds them in memory."""
    min_document_tokens = min_document_tokens or [0] * len(prefixes)
    pack_groups = pack_groups or [0] * len(prefixes)
    names = table.dataset_names
    tracker = StreamTracker(names)
    for name, (seq, grouped, offset, n) in (resume.streams if resume else {}).items():
        if name in names:
            tracker.finish(names.index(name), (seq, grouped), n, offset)
    index_cache: dict[tuple[int, StreamKey], SampleIndex] = {}
    out = []
    previous: Optional[ResolvedStage] = None
    for stage in table.stages:
        warmup = (mixture_warmup_counts(list(stage.warmup_from), list(stage.weights),
                                        stage.global_batch_size, stage.warmup_steps)
                  if stage.warmup_steps else None)
        datasets, indices, keys, starts = [], [], [], []
        for d, name in enumerate(names):
            weight = stage.weights[d]
            fading = warmup is not None and weight == 0 and warmup[:, d].any()
            if weight == 0 and not fading:
                datasets.append(PlanDataset(name=name, num_samples=0, weight=weight))
                indices.append(None), keys.append(None), starts.append(0)
                continue
            # A dataset read only during the warmup (fading out) keeps its previous mode.
            group_mode = previous.group_mode[d] if fading else stage.group_mode[d]
            key = (stage.seq_length, group_mode == "batch")
            if (d, key) not in index_cache:
                index_cache[(d, key)] = cached_sample_index(
                    prefixes[d], key[0], use_groups=key[1],
                    min_document_tokens=min_document_tokens[d], cache_dir=index_dir,
                    pack_groups=pack_groups[d])
            ix = index_cache[(d, key)]
            datasets.append(PlanDataset(
                name=name, num_samples=len(ix), weight=weight, min_share=stage.min_share[d],
                group_mode=group_mode, group_ids=ix.group_ids if key[1] else None,
                pack_groups=ix.pack_groups,
                groups_digest=ix.groups_digest if key[1] else None))
            indices.append(ix), keys.append(key)
            starts.append(tracker.start(d, key, len(ix), stage.name))
        inputs = PlanInputs(datasets=datasets, global_batch_size=stage.global_batch_size,
                            num_batches=stage.steps, seed=seed, start_offsets=starts,
                            fixed_counts=warmup)
        try:
            plan = get_plan(inputs)
        except ValueError as e:
            raise ValueError(f"stage '{stage.name}': {e}") from None
        for d, key in enumerate(keys):
            if key is not None:
                tracker.finish(d, key, len(indices[d]), plan.end_offsets[d])
        out.append((StagePlanInputs(stage, inputs, indices, keys), plan))
        previous = stage
    return out


class StagedSource:
    """``sample(i)``: the ``i``-th sample of the run over all stages (global position);
    token ids checked against ``vocab_size`` (see :class:`PlanSource`)."""

    def __init__(self, stage_plans: list[tuple[StagePlanInputs, DataPlan]], eod_id: int,
                 vocab_size: int | None = None):
        self.starts = [spi.stage.start_sample for spi, _ in stage_plans]
        self.sources = [PlanSource(plan, spi.indices, eod_id, vocab_size)
                        for spi, plan in stage_plans]

    def __len__(self) -> int:
        return self.starts[-1] + len(self.sources[-1])

    def sample(self, index: int) -> dict:
        s = bisect.bisect_right(self.starts, index) - 1
        return self.sources[s].sample(index - self.starts[s])


def plan_at_step(plans: list[tuple[StagePlanInputs, DataPlan]], step: int
                 ) -> tuple[StagePlanInputs, DataPlan, int]:
    """(stage inputs, stage plan, batch index inside that plan) of 0-based global ``step``."""
    for spi, plan in plans:
        if spi.stage.start_step <= step < spi.stage.end_step:
            return spi, plan, step - spi.stage.start_step
    raise IndexError(f"step {step} is past the run's last stage")
