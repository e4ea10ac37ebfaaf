"""megatron-core optimizer (Adam, optionally distributed) and its LR/WD scheduler.

The scheduler counts optimizer steps (increment 1 per step), so the LR at step ``s`` is
a pure function of ``s`` and a resume is exact.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional, Sequence

import torch

if TYPE_CHECKING:  # phoenix.config imports phoenix.optim.schedule: avoid the cycle
    from phoenix.config import RunConfig
    from phoenix.optim.param_groups import FreezeConfig, ParamGroupRule


def build_optimizer(cfg: RunConfig, model_chunks, layout, *,
                    param_rules: Optional[Sequence[ParamGroupRule]] = None,
                    freeze: Optional[FreezeConfig] = None):
    """megatron's optimizer for ``model_chunks``; with ``param_rules`` (per-group LR
    multipliers) or ``freeze``, their param groups on top of megatron's standard ones
    (see ``phoenix.optim.param_groups``; collective, raises ConfigError on a pattern
    that matches nothing). Such groups need the multi-phase scheduler."""
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    from phoenix.model.builder import params_dtype
    from phoenix.optim.compat import patch_distributed_optimizer_for_torch_adam

    patch_distributed_optimizer_for_torch_adam()

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


def uses_group_schedule(optimizer) -> bool:
    """Whether a param group has an LR multiplier or a freeze, which megatron-core
    0.16's ``OptimizerParamScheduler`` would silently ignore."""
    from phoenix.optim.schedule import MultiPhaseScheduler

    return any(g.get("lr_mult", 1.0) != 1.0 or g.get(MultiPhaseScheduler.FROZEN_STEPS_KEY)
               for g in optimizer.param_groups)


def build_scheduler(cfg: RunConfig, optimizer, *, force_multi_phase: bool = False):
    """The multi-phase schedule when ``optim.schedule`` is set, ``force_multi_phase`` is
    given or a param group has an LR multiplier or a freeze (the legacy ``optim`` LR
    fields are converted to phases, step for step); else megatron's scheduler."""
    from phoenix.optim.schedule import uses_multi_phase

    if uses_multi_phase(cfg) or force_multi_phase or uses_group_schedule(optimizer):
        from phoenix.optim.schedule import build_multi_phase_scheduler

        return build_multi_phase_scheduler(cfg, optimizer)
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    o = cfg.optim
    decay_steps = o.decay_steps or cfg.train.steps
    return OptimizerParamScheduler(
        optimizer,
        init_lr=0.0,
        max_lr=o.lr,
        min_lr=o.min_lr,
        lr_warmup_steps=o.warmup_steps,
        lr_decay_steps=max(decay_steps, o.warmup_steps + 1),
        lr_decay_style=o.decay_style,
        start_wd=o.weight_decay,
        end_wd=o.weight_decay,
        wd_incr_steps=max(decay_steps, 1),
        wd_incr_style="constant",
        use_checkpoint_opt_param_scheduler=True,
        override_opt_param_scheduler=False,
        wsd_decay_steps=o.wsd_decay_steps,
        lr_wsd_decay_style=o.wsd_decay_style,
    )


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
