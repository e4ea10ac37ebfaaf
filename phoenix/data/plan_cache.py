"""The run's data plans in its cache directory, and the one distributed step of the data.

:func:`run_stage_plans` maps a run config onto the per-stage driver
(:mod:`phoenix.data.stage_plans`), loading or building every plan in the run's cache
(``data.cache_dir``, else ``output_dir/data_cache``; the sample indices in
:func:`index_cache_dir`, shared by runs). :func:`build_source` is the run's
sample source, collective: one rank per cache directory (rank 0, or one per node when
``data.cache_dir`` is node-local) builds and caches every stage's plan, the others load
them. It is the only module of ``phoenix.data`` that uses the runtime's collectives.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Callable, Optional

from phoenix.config import ConfigError, RunConfig
from phoenix.data.data_resume import DataResume, rebase, streams_at
from phoenix.data.indexed import DataError, read_meta
from phoenix.data.megatron_blend import MegatronBlendSource
from phoenix.data.plan import DataPlan, PlanInputs
from phoenix.data.plan_source import load_or_build_plan
from phoenix.data.stage_plans import StagedSource, StagePlanInputs, stage_plans
from phoenix.runtime.startup import RankView, all_gather, broadcast, dir_views
from phoenix.tokenizer import model_vocab_size

log = logging.getLogger(__name__)


def cache_dir(cfg: RunConfig) -> Path:
    """Where the run's data plans are cached: ``data.cache_dir``, else
    ``<output_dir>/data_cache`` (a plan belongs to its run: inspect-batch and the spike
    records read it there)."""
    return Path(cfg.data.cache_dir or Path(cfg.output_dir) / "data_cache")


def shared_index_cache() -> Path:
    """The sample-index cache that runs share: ``$PHOENIX_CACHE_DIR/sample_index``, else
    ``$XDG_CACHE_HOME/phoenix/sample_index``, else ``~/.cache/phoenix/sample_index``."""
    root = os.environ.get("PHOENIX_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "phoenix")
    return Path(root) / "sample_index"


_warned_unwritable: set = set()


def index_cache_dir(cfg: RunConfig) -> Path:
    """Where the sample indices of ``cfg``'s datasets are cached and mapped from:
    ``data.cache_dir`` when set; else the cache that every run over the same data shares
    (:func:`shared_index_cache`), so a new ``output_dir`` does not cut the same datasets
    again. An index is keyed by the content of its files and the cut
    (:mod:`phoenix.data.sample_cache`), and concurrent builders are safe, so sharing is
    too. A shared cache that cannot be written falls back to the run's
    :func:`cache_dir`, with a warning."""
    if cfg.data.cache_dir:
        return Path(cfg.data.cache_dir)
    shared = shared_index_cache()
    try:
        shared.mkdir(parents=True, exist_ok=True)
        if os.access(shared, os.W_OK | os.X_OK):
            return shared
    except OSError:
        pass
    if str(shared) not in _warned_unwritable:
        _warned_unwritable.add(str(shared))
        log.warning("sample-index cache %s cannot be written; caching in the run's %s (set "
                    "PHOENIX_CACHE_DIR or data.cache_dir to share it between runs)",
                    shared, cache_dir(cfg))
    return cache_dir(cfg)


def run_stage_plans(cfg: RunConfig, get_plan: Callable[[PlanInputs], DataPlan] | None = None,
                    resume: Optional[DataResume] = None, recut: bool = True,
                    ) -> list[tuple[StagePlanInputs, DataPlan]]:
    """Every stage's (inputs, plan) in order, from ``resume``'s step when given;
    ``get_plan`` defaults to load-or-build in the run's cache; ``recut=False``: the
    streams of a run begun before re-cut streams continued exactly (see
    :func:`phoenix.data.stage_plans.stage_plans`). Raises ValueError naming the stage and
    dataset on bad inputs."""
    if get_plan is None:
        def get_plan(inputs):
            return load_or_build_plan(inputs, cache_dir(cfg))[0]
    datasets = cfg.data.datasets
    return stage_plans(rebase(cfg.resolved.stages, resume), [e.prefix for e in datasets],
                       cfg.train.seed, get_plan, resume,
                       min_document_tokens=[e.min_document_tokens for e in datasets],
                       pack_groups=[e.pack_groups for e in datasets],
                       index_dir=index_cache_dir(cfg), recut=recut)


def data_change(old: RunConfig, old_resume: Optional[DataResume], step: int,
                get_plan: Callable[[PlanInputs], DataPlan] | None = None,
                recut: bool = True) -> DataResume:
    """The implicit stage boundary of a resume at ``step`` whose data changed: where the
    old config's plans (as that run had them) left every stream. Rank 0 only (it loads
    or builds the old plans, through ``get_plan`` when given); raises ValueError when no
    exact position exists."""
    plans = run_stage_plans(old, get_plan, resume=old_resume, recut=recut)
    table = rebase(old.resolved.stages, old_resume)
    return DataResume(step=step, start_sample=table.samples_before(step),
                      streams=streams_at(plans, step, old_resume))


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
                 changed_from: Optional[tuple[RunConfig, int]] = None, recut: bool = True):
    """The sample source of the run and its DataResume (None: the plans start at step 0);
    collective (every rank calls it).

    ``resume``: the boundary the checkpoint recorded, if any. ``changed_from``: ``(the
    checkpoint's config, the resume step)`` when the resume changes the data: a new
    boundary at that step is computed on rank 0 (see phoenix.data.data_resume).
    ``recut``: see :func:`run_stage_plans`.

    Rank 0 builds every stage's plan into its cache directory; where ``data.cache_dir`` is
    node-local, one rank per other directory then builds its own copy (the plans are
    deterministic); the other ranks load them. A plan input error stops every rank with
    the same message.

    Every sample's token ids must lie in ``[0, vocab_size)`` (default: ``model.vocab_size``,
    else the tokenizer's size, as the model is built); an id outside it raises DataError
    naming the dataset and sample when it is read, before the forward pass.
    """
    vocab_size = vocab_size or model_vocab_size(cfg, tokenizer)
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
        return megatron_source(cfg, tokenizer, vocab_size), None
    builders = plan_builders(views)
    if blind and rank == 0:
        log.warning("data.cache_dir %s is not shared by every rank (%s cannot see rank 0's %s): "
                    "the data plan is built or loaded once per directory, by ranks %s",
                    cfg.data.cache_dir, ", ".join(map(str, blind)), views[0].path, builders)
    error = None
    if rank == 0:
        try:
            if changed_from is not None:
                resume = data_change(changed_from[0], resume, changed_from[1], recut=recut)
            plans = run_stage_plans(cfg, resume=resume, recut=recut)
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
                plans = run_stage_plans(cfg, resume=resume, recut=recut)
            except ValueError as e:
                error = str(e)
        errors = [e for e in all_gather(error) if e is not None]
        if errors:
            raise DataError(f"data plan: {errors[0]}")
    if rank not in builders:
        plans = run_stage_plans(cfg, lambda inputs: load_or_build_plan(inputs, directory,
                                                                       build=False)[0], resume, recut)
    return StagedSource(plans, tokenizer.eod_id, vocab_size), resume


def megatron_source(cfg: RunConfig, tokenizer, vocab_size: int) -> MegatronBlendSource:
    """``data.sampler: megatron``: megatron-core's own blend of ``data.datasets`` (one stage).

    It gets the config's weights as written, not the stage table's normalised fractions:
    megatron normalises them itself, in float64, and keys its index cache on the result,
    so the blend is the one Megatron-LM builds from the same ``--data-path`` weights. (The
    stage table has checked them already.)"""
    d = cfg.data
    return MegatronBlendSource(
        prefixes=[e.prefix for e in d.datasets], weights=[e.weight for e in d.datasets],
        names=[e.display_name for e in d.datasets], seq_length=d.seq_length,
        num_samples=cfg.train.steps * cfg.train.global_batch_size, seed=cfg.train.seed,
        vocab_size=tokenizer.vocab_size, eod_id=tokenizer.eod_id, cache_dir=str(cache_dir(cfg)),
        check_vocab_size=vocab_size)
