"""Builds the run's sample source from the config (the stage plans or megatron's blend).

The data layer itself takes plain arguments; this module maps config sections onto it
and does the one distributed step: rank 0 builds and caches every stage's plan, the
others load them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch.distributed as dist

from phoenix.config import RunConfig
from phoenix.data.indexed import DataError
from phoenix.data.megatron_blend import MegatronBlendSource
from phoenix.data.plan import DataPlan, PlanInputs
from phoenix.data.plan_source import load_or_build_plan
from phoenix.stages.plans import StagePlanInputs, StagedSource, stage_plans


def cache_dir(cfg: RunConfig) -> Path:
    return Path(cfg.data.cache_dir or Path(cfg.output_dir) / "data_cache")


def run_stage_plans(cfg: RunConfig, get_plan: Callable[[PlanInputs], DataPlan] | None = None,
                    ) -> list[tuple[StagePlanInputs, DataPlan]]:
    """Every stage's (inputs, plan) in order; ``get_plan`` defaults to load-or-build in
    the run's cache. Raises ValueError naming the stage and dataset on bad inputs."""
    if get_plan is None:
        def get_plan(inputs):
            return load_or_build_plan(inputs, cache_dir(cfg))[0]
    return stage_plans(cfg.stage_table(), [e.prefix for e in cfg.data.datasets], cfg.train.seed,
                       get_plan)


def plan_at_step(plans: list[tuple[StagePlanInputs, DataPlan]], step: int
                 ) -> tuple[StagePlanInputs, DataPlan, int]:
    """(stage inputs, stage plan, batch index inside that plan) of 0-based global ``step``."""
    for spi, plan in plans:
        if spi.stage.start_step <= step < spi.stage.end_step:
            return spi, plan, step - spi.stage.start_step
    raise IndexError(f"step {step} is past the run's last stage")


def build_source(cfg: RunConfig, rank: int, tokenizer):
    """The sample source of the run; collective (every rank calls it)."""
    if cfg.data.sampler == "megatron":
        d = cfg.data
        return MegatronBlendSource(
            prefixes=[e.prefix for e in d.datasets], weights=[e.weight for e in d.datasets],
            names=[e.display_name for e in d.datasets], seq_length=d.seq_length,
            num_samples=cfg.train.steps * cfg.train.global_batch_size, seed=cfg.train.seed,
            vocab_size=tokenizer.vocab_size, eod_id=tokenizer.eod_id, cache_dir=str(cache_dir(cfg)))
    error = None
    if rank == 0:
        try:
            plans = run_stage_plans(cfg)
        except ValueError as e:  # the plan's input checks (weights, groups, min_share, ...)
            error = e
    # Every rank learns whether rank 0 could build the plans, so all stop together.
    failed = [error is not None]
    dist.broadcast_object_list(failed, src=0)
    if failed[0]:
        raise DataError(f"data plan: {error}" if error else "data plan: rank 0 could not build it")
    if rank != 0:
        plans = run_stage_plans(cfg, lambda inputs: load_or_build_plan(inputs, cache_dir(cfg),
                                                                       build=False)[0])
    return StagedSource(plans, tokenizer.eod_id)
