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
weight 0), so dataset ids are the same in every stage.

:func:`build_source` maps a run config onto this (or onto megatron's blend) and does the
one distributed step: one rank per cache directory (rank 0, or one per node when
``data.cache_dir`` is node-local) builds and caches every stage's plan, the others load them.
"""

from __future__ import annotations

import bisect
import logging
import math
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Callable, Optional

from phoenix.config import ConfigError, RunConfig
from phoenix.config.stage_table import ResolvedStage, StageTable
from phoenix.data.data_resume import DataResume, rebase, streams_at
from phoenix.data.indexed import DataError, read_meta
from phoenix.data.megatron_blend import MegatronBlendSource
from phoenix.data.plan import DataPlan, PlanDataset, PlanInputs
from phoenix.data.plan_counts import mixture_warmup_counts
from phoenix.data.plan_source import PlanSource, load_or_build_plan
from phoenix.data.sample_cache import cached_sample_index
from phoenix.data.samples import SampleIndex
from phoenix.runtime.startup import RankView, all_gather, broadcast, dir_views

log = logging.getLogger(__name__)

StreamKey = tuple[int, bool]  # (seq_length, cut at group boundaries)


@dataclass
class StagePlanInputs:
    stage: ResolvedStage
    inputs: PlanInputs
    indices: list[Optional[SampleIndex]]
    """Sample index of every dataset read in the stage (None: not read)."""
    keys: list[Optional[StreamKey]]


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
        log.warning("stage '%s': dataset '%s' is read with (seq_length, grouped) %s instead of %s: "
                    "its samples come from another stream, started at the same fraction of epochs "
                    "(%.3f); samples of the current epoch may repeat", stage, self.names[d], key,
                    last_key, offset / last_n)
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
    ``pack_groups``: per dataset, tail packing's unit size when it is read grouped (0: off).
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
                datasets.append(PlanDataset(name=name, num_samples=0, weight=0.0))
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
                name=name, num_samples=len(ix), weight=float(weight), min_share=stage.min_share[d],
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


# ------------------------------------------------------------------ run config


def cache_dir(cfg: RunConfig) -> Path:
    return Path(cfg.data.cache_dir or Path(cfg.output_dir) / "data_cache")


def run_stage_plans(cfg: RunConfig, get_plan: Callable[[PlanInputs], DataPlan] | None = None,
                    resume: Optional[DataResume] = None) -> list[tuple[StagePlanInputs, DataPlan]]:
    """Every stage's (inputs, plan) in order, from ``resume``'s step when given;
    ``get_plan`` defaults to load-or-build in the run's cache. Raises ValueError naming
    the stage and dataset on bad inputs."""
    if get_plan is None:
        def get_plan(inputs):
            return load_or_build_plan(inputs, cache_dir(cfg))[0]
    datasets = cfg.data.datasets
    return stage_plans(rebase(cfg.resolved.stages, resume), [e.prefix for e in datasets],
                       cfg.train.seed, get_plan, resume,
                       min_document_tokens=[e.min_document_tokens for e in datasets],
                       pack_groups=[e.pack_groups for e in datasets],
                       index_dir=cache_dir(cfg))


def data_change(old: RunConfig, old_resume: Optional[DataResume], step: int) -> DataResume:
    """The implicit stage boundary of a resume at ``step`` whose data changed: where the
    old config's plans (as that run had them) left every stream. Rank 0 only (it loads
    or builds the old plans); raises ValueError when no exact position exists."""
    plans = run_stage_plans(old, resume=old_resume)
    table = rebase(old.resolved.stages, old_resume)
    return DataResume(step=step, start_sample=table.samples_before(step),
                      streams=streams_at(plans, step, old_resume))


def plan_at_step(plans: list[tuple[StagePlanInputs, DataPlan]], step: int
                 ) -> tuple[StagePlanInputs, DataPlan, int]:
    """(stage inputs, stage plan, batch index inside that plan) of 0-based global ``step``."""
    for spi, plan in plans:
        if spi.stage.start_step <= step < spi.stage.end_step:
            return spi, plan, step - spi.stage.start_step
    raise IndexError(f"step {step} is past the run's last stage")


def warn_unchecked_tokenizers(cfg: RunConfig) -> list[str]:
    """Warn, once per dataset prefix, when its tokenizer cannot be checked against
    ``tokenizer.model`` (no ``.meta.json`` with a fingerprint: data from another builder).
    Returns the prefixes warned about."""
    unchecked = []
    for prefix in dict.fromkeys(e.prefix for e in cfg.data.datasets):
        meta = read_meta(prefix)
        if (meta or {}).get("tokenizer_fingerprint"):
            continue
        why = "no tokenizer_fingerprint in" if meta is not None else "no"
        log.warning("data prefix '%s': %s %s.meta.json (not written by phoenix preprocess), so "
                    "its tokenizer cannot be checked against tokenizer.model %s; only its token "
                    "ids are checked, as samples are read", prefix, why, prefix,
                    cfg.tokenizer.path)
        unchecked.append(prefix)
    return unchecked


def plan_builders(views: list[RankView]) -> list[int]:
    """Ranks that build the data plan into their cache directory: rank 0 for every rank
    that sees its directory, and the lowest rank of each other (host, path) for the rest
    (a node-local ``data.cache_dir``). The plan is deterministic, so every copy is the same."""
    groups: dict[tuple[str, str], int] = {}
    for v in views:
        if not v.sees:
            groups.setdefault((v.host, v.path), v.rank)
    return [0, *sorted(groups.values())]


def build_source(cfg: RunConfig, rank: int, tokenizer, vocab_size: int | None = None,
                 resume: Optional[DataResume] = None,
                 changed_from: Optional[tuple[RunConfig, int]] = None):
    """The sample source of the run and its DataResume (None: the plans start at step 0);
    collective (every rank calls it).

    ``resume``: the boundary the checkpoint recorded, if any. ``changed_from``: ``(the
    checkpoint's config, the resume step)`` when the resume changes the data: a new
    boundary at that step is computed on rank 0 (see phoenix.data.data_resume).

    Rank 0 builds every stage's plan into its cache directory; where ``data.cache_dir`` is
    node-local, one rank per other directory then builds its own copy (the plans are
    deterministic); the other ranks load them. A plan input error stops every rank with
    the same message.

    Every sample's token ids must lie in ``[0, vocab_size)`` (default: ``model.vocab_size``,
    else the tokenizer's size, as the model is built); an id outside it raises DataError
    naming the dataset and sample when it is read, before the forward pass.
    """
    vocab_size = vocab_size or cfg.model.vocab_size or tokenizer.vocab_size
    if rank == 0:
        warn_unchecked_tokenizers(cfg)
    directory = cache_dir(cfg)
    try:
        views = dir_views(directory)
    except OSError as e:  # raised on every rank
        raise ConfigError(f"data.cache_dir: {e}") from None
    blind = [v for v in views if not v.sees]
    if cfg.data.sampler == "megatron":
        if blind:  # megatron's dataset builder writes its indices on global rank 0 only
            raise ConfigError(
                f"data.cache_dir: {', '.join(map(str, blind))} cannot see rank 0's {views[0].path}; "
                f"data.sampler 'megatron' needs a cache directory that every node shares")
        d = cfg.data
        return MegatronBlendSource(
            prefixes=[e.prefix for e in d.datasets], weights=[e.weight for e in d.datasets],
            names=[e.display_name for e in d.datasets], seq_length=d.seq_length,
            num_samples=cfg.train.steps * cfg.train.global_batch_size, seed=cfg.train.seed,
            vocab_size=tokenizer.vocab_size, eod_id=tokenizer.eod_id, cache_dir=str(directory),
            check_vocab_size=vocab_size), None
    builders = plan_builders(views)
    if blind and rank == 0:
        log.warning("data.cache_dir %s is not shared by every rank (%s cannot see rank 0's %s): "
                    "the data plan is built or loaded once per directory, by ranks %s",
                    cfg.data.cache_dir, ", ".join(map(str, blind)), views[0].path, builders)
    error = None
    if rank == 0:
        try:
            if changed_from is not None:
                resume = data_change(changed_from[0], resume, changed_from[1])
            plans = run_stage_plans(cfg, resume=resume)
        except ValueError as e:  # the plan's input checks (weights, groups, min_share, ...)
            error = e
    # Every rank learns whether rank 0 could build the plans (and where a data change
    # left the streams), so all stop together or read the same plans.
    shared = broadcast([None if error is None else str(error), resume.to_dict() if resume else None])
    if shared[0] is not None:
        raise DataError(f"data plan: {shared[0]}")
    resume = DataResume.from_dict(shared[1])
    if len(builders) > 1:  # node-local caches: one more builder per directory
        error = None
        if rank in builders[1:]:
            try:
                plans = run_stage_plans(cfg, resume=resume)
            except ValueError as e:
                error = str(e)
        errors = [e for e in all_gather(error) if e is not None]
        if errors:
            raise DataError(f"data plan: {errors[0]}")
    if rank not in builders:
        plans = run_stage_plans(cfg, lambda inputs: load_or_build_plan(inputs, directory,
                                                                       build=False)[0], resume)
    return StagedSource(plans, tokenizer.eod_id, vocab_size), resume
