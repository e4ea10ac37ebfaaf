"""megatron-core optimizer (Adam, optionally distributed) and its LR/WD scheduler.

The scheduler (:class:`phoenix.optim.schedule.MultiPhaseScheduler`) counts optimizer
steps (increment 1 per step), so the LR at step ``s`` is a pure function of ``s`` and a
resume is exact.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from phoenix.config import RunConfig
from phoenix.config.optim import FreezeConfig, ParamGroupRule


def build_optimizer(cfg: RunConfig, model_chunks, layout, *,
                    param_rules: Optional[Sequence[ParamGroupRule]] = None,
                    freeze: Optional[FreezeConfig] = None):
    """megatron's optimizer for ``model_chunks``; with ``param_rules`` (per-group LR
    multipliers) or ``freeze``, their param groups on top of megatron's standard ones
    (see ``phoenix.optim.param_groups``; collective, raises ConfigError on a pattern
    that matches nothing), applied by the scheduler."""
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    from phoenix.model.builder import params_dtype
    from phoenix.optim.compat import (
        patch_distributed_optimizer_for_torch_adam,
        patch_fully_reshardable_multi_bucket,
    )

    patch_distributed_optimizer_for_torch_adam()
    patch_fully_reshardable_multi_bucket()

    o, precision = cfg.optim, cfg.train.precision
    config = OptimizerConfig(
        optimizer="adam",
        lr=o.lr,
        min_lr=o.min_lr,
        weight_decay=o.weight_decay,
        adam_beta1=o.adam_beta1,
        adam_beta2=o.adam_beta2,
        adam_eps=o.adam_eps,
        clip_grad=o.clip_grad,
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        params_dtype=params_dtype(precision),
        use_distributed_optimizer=cfg.parallel.use_distributed_optimizer,
    )
    # megatron's own process groups (parallel_state) are used: passing the collection
    # explicitly would disable the gloo side groups its checkpointing relies on.
    if not param_rules and freeze is None:
        return get_megatron_optimizer(config, model_chunks)
    from phoenix.optim.param_groups import build_config_overrides

    overrides = build_config_overrides(config, model_chunks, param_rules, freeze,
                                       rules_key="optim.param_groups", freeze_key="optim.freeze")
    return get_megatron_optimizer(config, model_chunks, config_overrides=overrides)


def build_scheduler(cfg: RunConfig, optimizer):
    """The run's one LR / weight-decay scheduler: the multi-phase schedule resolved with
    the config (``optim.schedule``, the stages' ``lr`` phases, or the legacy ``optim``
    fields as phases). It also applies param groups' LR multipliers and freezes."""
    from phoenix.optim.schedule import build_multi_phase_scheduler

    return build_multi_phase_scheduler(cfg, optimizer)


def ensure_optimizer_state(optimizer) -> None:
    """Give every parameter an (empty) Adam state before a checkpoint is loaded into it.

    megatron-core's distributed optimizer builds its load template from the current
    state, and with torch's Adam (no apex/TE, e.g. on CPU) a fresh optimizer has none:
    no ``step`` entry, so the template cannot be built. Zero moments and step 0 are what
    Adam would create lazily; the loaded checkpoint then overwrites them.
    """
    inner = [getattr(o, "optimizer", None) for o in getattr(optimizer, "chained_optimizers", [optimizer])]
    for opt in inner:
        if opt is None:
            continue
        for group in opt.param_groups:
            for p in group["params"]:
                state = opt.state[p]
                if "exp_avg" not in state:
                    state["exp_avg"] = torch.zeros_like(p.data)
                    state["exp_avg_sq"] = torch.zeros_like(p.data)
                if "step" not in state:
                    state["step"] = torch.tensor(0.0)
