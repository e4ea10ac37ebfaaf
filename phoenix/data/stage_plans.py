"""One data plan per stage, each continuing every dataset's sample stream.

A dataset's *stream* is its epoch-permuted sample order for one sample index, i.e. for
one ``(seq_length, grouped)`` pair: samples of a different length, or cut at group
boundaries, are different samples. Between stages that read a dataset with the same
pair, the next stage starts exactly at the previous stage's end offset (the data plan
continues the same epochs). When a stage changes a dataset's sequence length in
mid-epoch, the new cut first reads the tokens of that epoch not yet read, re-cut at the
new length, then whole epochs (:mod:`phoenix.data.stream_recut`): no token twice before
the epoch ends, none skipped. Where no exact continuation exists (a change of grouping
in mid-epoch, ``pack_groups`` with a new length, a grouped stream stopped inside a
group, a second re-cut inside one epoch) the new stream starts at the same *fraction of
epochs* already consumed and a warning says that tokens of the current epoch may repeat
or be skipped; at a resume's implicit boundary that is refused instead.

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
from phoenix.data.stream_recut import Cursor, StreamHead, continuation

log = logging.getLogger(__name__)

StreamKey = tuple[int, bool]  # (seq_length, cut at group boundaries)


@dataclass
class StagePlanInputs:
    stage: ResolvedStage
    inputs: PlanInputs
    indices: list[Optional[SampleIndex]]
    """Sample index of every dataset read in the stage (None: not read)."""
    keys: list[Optional[StreamKey]]
    origins: list[Optional[Cursor]] = None
    """Per dataset: the cursor of the old cut whose epoch remainder it reads first (a
    stream re-cut in mid-epoch, :mod:`phoenix.data.stream_recut`), with the seed that cut
    was read in when it is not the stage's, else None."""


def _cut(key: StreamKey) -> str:
    seq, grouped = key
    return f"samples of {seq} tokens" + (" within its groups (group_mode: batch)" if grouped
                                          else "")


class StreamTracker:
    """Where each dataset's stream stands between stages: its cursor ``(seq_length,
    grouped, offset, samples per epoch)``, the seed of its order, and, while it reads the
    remainder of an epoch re-cut in mid-epoch, the old cursor that remainder continues
    (its *origin*, with the seed it was read with, from which
    :func:`phoenix.data.stream_recut.continuation` rebuilds the remainder), or, while it
    reads the remainder of an epoch reseeded in mid-epoch, that remainder's head."""

    def __init__(self, names: list[str], seed: int,
                 index_of: Callable[[int, StreamKey], SampleIndex], recut: bool = True):
        self.names, self.seed, self.index_of, self.recut = names, seed, index_of, recut
        self.offsets: dict[tuple[int, StreamKey], int] = {}
        self.cursor: dict[int, Cursor] = {}
        self.origin: dict[int, Optional[tuple]] = {}
        self.seeds: dict[int, int] = {}
        self.reseed: dict[int, Optional[StreamHead]] = {}

    def start(self, d: int, key: StreamKey, index: SampleIndex, packed: bool, stage: str,
              strict: bool = False, seed: Optional[int] = None,
              ) -> tuple[int, Optional[StreamHead], SampleIndex, Optional[tuple]]:
        """(start offset, head, the index the plan reads, origin) of dataset ``d`` read
        with ``key`` (whose sample index is ``index``) and in ``seed``'s order (default:
        the run's) from the next stage on. ``strict`` (a resume's implicit boundary): a
        change of cut or seed without an exact continuation raises ValueError instead of
        starting at the same fraction of an epoch."""
        seed = self.seed if seed is None else seed
        if d not in self.cursor:
            return 0, None, index, None
        seq, grouped, offset, n = self.cursor[d]
        origin, reseeded = self.origin.get(d), self.reseed.get(d)
        old_seed = self.seeds.get(d, self.seed)
        name = self.names[d]
        if (seq, grouped) == key and seed == old_seed:
            if reseeded is not None:
                return offset, reseeded, index, None
            if origin is None:
                return offset, None, index, None
            _, head, continued = continuation(self.index_of(d, origin[:2]), origin[:4], index,
                                              key[1], packed, seed, name,
                                              origin[4] if len(origin) > 4 else seed)
            return offset, head, continued, origin
        exact = None if origin is not None or reseeded is not None or not self.recut else \
            continuation(self.index_of(d, (seq, grouped)), self.cursor[d], index, key[1], packed,
                         seed, name, old_seed)
        if exact is not None:
            start, head, continued = exact
            if head is not None and head.from_seed is not None:
                log.info("stage '%s': dataset '%s' is reshuffled with seed %d in epoch %d: its %d "
                         "unread samples first, then whole epochs in the new order", stage, name,
                         seed, head.epoch, head.count)
            elif head is not None:
                log.info("stage '%s': dataset '%s' is re-cut into %s in epoch %d: the %d "
                         "unread %s continue as %d samples, then whole epochs of the new cut",
                         stage, name, _cut(key), head.epoch, n - offset % n,
                         _cut((seq, grouped)), head.count)
            recut = head is not None and head.from_seed is None
            origin = self.cursor[d] if old_seed == seed else (*self.cursor[d], old_seed)
            return start, head, continued, origin if recut else None
        why = ("it is re-cut or reseeded a second time inside the same epoch"
               if origin is not None or reseeded is not None else
               "a grouped stream stopped inside a group, a change of grouping, or pack_groups "
               "with a new seq_length has no exact continuation")
        change = (f"with (seq_length, grouped) {key} instead of {(seq, grouped)}"
                  if (seq, grouped) != key else f"with data_seed {seed} instead of {old_seed}")
        if strict and self.recut:
            raise ValueError(f"dataset '{name}' would be read {change} from the middle of its "
                             f"epoch {offset // n} ({why}); keep its cut and seed until a stage "
                             f"that begins after the resume step, or resume at an epoch boundary")
        start = max(self.offsets.get((d, key), 0), math.ceil(Fraction(offset, n) * len(index)))
        if (seq, grouped) != key:  # in words a user can act on (the error above is for logs)
            said, keep = (f"cut into {_cut(key)}, the stage before it into "
                          f"{_cut((seq, grouped))}"), "its cut"
        else:
            said, keep = (f"read in the order of data_seed {seed}, the stage before it in that "
                          f"of {old_seed}"), "its data_seed"
        log.warning("stage '%s': dataset '%s' is %s, in mid-epoch, and %s: it is read from a "
                    "new sample order that starts %.1f%% into its epoch, so until the epoch "
                    "ends some of its tokens may be read twice and others not at all. To read "
                    "on without repeats, keep %s until the epoch ends",
                    stage, name, said, why, 100 * offset / n, keep)
        return start, None, index, None

    def finish(self, d: int, key: StreamKey, num_samples: int, end_offset: int,
               origin: Optional[tuple] = None, seed: Optional[int] = None,
               head: Optional[StreamHead] = None) -> None:
        self.offsets[(d, key)] = int(end_offset)
        self.cursor[d] = (key[0], key[1], int(end_offset), int(num_samples))
        self.seeds[d] = self.seed if seed is None else int(seed)
        # the remainder's origin matters only while the stream is inside that epoch
        inside = origin is not None and end_offset < (origin[2] // origin[3] + 1) * num_samples
        self.origin[d] = tuple(origin) if inside else None
        inside = head is not None and head.from_seed is not None and \
            end_offset < (head.epoch + 1) * num_samples
        self.reseed[d] = head if inside else None


def stage_plans(table: StageTable, prefixes: list[str], seed: int,
                get_plan: Callable[[PlanInputs], DataPlan], resume: Optional[DataResume] = None,
                min_document_tokens: Optional[list[int]] = None,
                pack_groups: Optional[list[int]] = None,
                index_dir: Optional[Path] = None, recut: bool = True,
                ) -> list[tuple[StagePlanInputs, DataPlan]]:
    """Build (or load, through ``get_plan``) every stage's plan in order; each stage's
    start offsets come from the plans before it, or from ``resume`` (where the streams
    stood at the first stage's start, see phoenix.data.data_resume); a dataset re-cut in
    mid-epoch continues exactly (:mod:`phoenix.data.stream_recut`), or, where no exact
    continuation exists, from the same fraction of an epoch with a warning (refused at a
    resume's implicit boundary: ValueError).
    ``min_document_tokens``: per dataset, the document-length view it reads (0: all).
    ``pack_groups``: per dataset, group packing's unit size when it is read grouped (0: off).
    ``index_dir``: where the sample indices are cached and memory-mapped from
    (:mod:`phoenix.data.sample_cache`); None builds them in memory.
    ``recut=False``: every change of cut starts at the same fraction of an epoch, as
    before exact continuations existed: a run whose checkpoint predates them
    (:class:`phoenix.data.data_resume.DataState`) resumes with the plans it began."""
    min_document_tokens = min_document_tokens or [0] * len(prefixes)
    pack_groups = pack_groups or [0] * len(prefixes)
    names = table.dataset_names
    index_cache: dict[tuple[int, StreamKey], SampleIndex] = {}

    def index_of(d: int, key: StreamKey) -> SampleIndex:
        if (d, key) not in index_cache:
            index_cache[(d, key)] = cached_sample_index(
                prefixes[d], key[0], use_groups=key[1],
                min_document_tokens=min_document_tokens[d], cache_dir=index_dir,
                pack_groups=pack_groups[d])
        return index_cache[(d, key)]

    tracker = StreamTracker(names, seed, index_of, recut)
    for name, (seq, grouped, offset, n, origin, *order) in (resume.streams if resume else {}).items():
        if name in names:  # order: (the stream's seed, its reseeded remainder), if recorded
            tracker.finish(names.index(name), (seq, grouped), n, offset, origin, *order)
    out = []
    previous: Optional[ResolvedStage] = None
    for stage in table.stages:
        warmup = (mixture_warmup_counts(list(stage.warmup_from), list(stage.weights),
                                        stage.global_batch_size, stage.warmup_steps)
                  if stage.warmup_steps else None)
        datasets, indices, keys, starts, heads, origins = [], [], [], [], [], []
        for d, name in enumerate(names):
            weight = stage.weights[d]
            fading = warmup is not None and weight == 0 and warmup[:, d].any()
            if weight == 0 and not fading:
                datasets.append(PlanDataset(name=name, num_samples=0, weight=weight))
                indices.append(None), keys.append(None), starts.append(0)
                heads.append(None), origins.append(None)
                continue
            # A dataset read only during the warmup (fading out) keeps its previous mode.
            group_mode = previous.group_mode[d] if fading else stage.group_mode[d]
            key = (stage.seq_length, group_mode == "batch")
            ix = index_of(d, key)
            strict = resume is not None and not out   # the resume's implicit boundary
            start, head, read, origin = tracker.start(d, key, ix, bool(key[1] and pack_groups[d]),
                                                      stage.name, strict, stage.data_seed)
            datasets.append(PlanDataset(
                name=name, num_samples=len(ix), weight=weight, min_share=stage.min_share[d],
                group_mode=group_mode, group_ids=ix.group_ids if key[1] else None,
                pack_groups=ix.pack_groups,
                groups_digest=ix.groups_digest if key[1] else None))
            indices.append(read), keys.append(key), starts.append(start)
            heads.append(head), origins.append(origin)
        inputs = PlanInputs(datasets=datasets, global_batch_size=stage.global_batch_size,
                            num_batches=stage.steps, seed=seed, start_offsets=starts,
                            fixed_counts=warmup,
                            heads=heads if any(h is not None for h in heads) else None,
                            stream_seed=stage.data_seed if stage.data_seed != seed else None)
        try:
            plan = get_plan(inputs)
        except ValueError as e:
            raise ValueError(f"stage '{stage.name}': {e}") from None
        for d, key in enumerate(keys):
            if key is not None:
                tracker.finish(d, key, datasets[d].num_samples, plan.end_offsets[d], origins[d],
                               stage.data_seed, heads[d])
        out.append((StagePlanInputs(stage, inputs, indices, keys, origins), plan))
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

    def provenance(self, index: int) -> dict:
        """The origin of sample ``index`` (:meth:`PlanSource.provenance`; no token read)."""
        s = bisect.bisect_right(self.starts, index) - 1
        return self.sources[s].provenance(index - self.starts[s])


def plan_at_step(plans: list[tuple[StagePlanInputs, DataPlan]], step: int
                 ) -> tuple[StagePlanInputs, DataPlan, int]:
    """(stage inputs, stage plan, batch index inside that plan) of 0-based global ``step``."""
    for spi, plan in plans:
        if spi.stage.start_step <= step < spi.stage.end_step:
            return spi, plan, step - spi.stage.start_step
    raise IndexError(f"step {step} is past the run's last stage")
