"""Builds the run's sample source from the data config (the plan or megatron's blend).

The data layer itself takes plain arguments; this module maps config sections onto it
and does the one distributed step: rank 0 builds and caches the plan, the others load it.
"""

from __future__ import annotations

from pathlib import Path

import torch.distributed as dist

from phoenix.config import RunConfig
from phoenix.data.indexed import DataError
from phoenix.data.megatron_blend import MegatronBlendSource
from phoenix.data.plan_source import (
    PlanDatasetSpec,
    PlanSource,
    build_indices,
    load_or_build_plan,
    plan_inputs,
)


def cache_dir(cfg: RunConfig) -> Path:
    return Path(cfg.data.cache_dir or Path(cfg.output_dir) / "data_cache")


def plan_specs(cfg: RunConfig) -> list[PlanDatasetSpec]:
    return [PlanDatasetSpec(name=e.display_name, prefix=e.prefix, weight=e.weight,
                            min_share=e.min_share, group_mode=e.group_mode)
            for e in cfg.data.datasets]


def run_plan_inputs(cfg: RunConfig):
    """(specs, sample indices, plan inputs) of the whole run as one stage."""
    specs = plan_specs(cfg)
    indices = build_indices(specs, cfg.data.seq_length)
    inputs = plan_inputs(specs, indices, cfg.train.global_batch_size, cfg.train.steps,
                         cfg.train.seed)
    return specs, indices, inputs


def build_source(cfg: RunConfig, rank: int, tokenizer):
    """The sample source of the run; collective (every rank calls it)."""
    if cfg.data.sampler == "megatron":
        d = cfg.data
        return MegatronBlendSource(
            prefixes=[e.prefix for e in d.datasets], weights=[e.weight for e in d.datasets],
            names=[e.display_name for e in d.datasets], seq_length=d.seq_length,
            num_samples=cfg.train.steps * cfg.train.global_batch_size, seed=cfg.train.seed,
            vocab_size=tokenizer.vocab_size, eod_id=tokenizer.eod_id, cache_dir=str(cache_dir(cfg)))
    _, indices, inputs = run_plan_inputs(cfg)
    error = None
    if rank == 0:
        try:
            plan, _ = load_or_build_plan(inputs, cache_dir(cfg))
        except ValueError as e:  # the plan's input checks (weights, groups, min_share, ...)
            error = e
    # Every rank learns whether rank 0 could build the plan, so all stop together.
    failed = [error is not None]
    dist.broadcast_object_list(failed, src=0)
    if failed[0]:
        raise DataError(f"data plan: {error}" if error else "data plan: rank 0 could not build it")
    if rank != 0:
        plan, _ = load_or_build_plan(inputs, cache_dir(cfg), build=False)
    return PlanSource(plan, indices, tokenizer.eod_id)
