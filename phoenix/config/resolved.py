"""The pure resolution of a run config: stages and LR phases placed on the step axis.

:func:`resolve_run` is called once, when a :class:`~phoenix.config.schema.RunConfig` is
built; everything downstream (trainer, data plans, scheduler, lr-plot, tools) reads
``cfg.resolved`` instead of recomputing it. Every mistake a recipe can make in its
stages or LR phases therefore fails when the config is loaded (``--dry-run`` included),
with the key that holds it.

Where the LR comes from, in order:

1. the stages' ``lr`` phases, joined into one schedule (``optim.schedule`` may give
   ``peak_lr``, ``min_lr`` and ``weight_decay`` but no phases);
2. ``optim.schedule.phases``;
3. the legacy ``optim`` fields (``warmup_steps``, ``decay_style``, ``decay_steps``,
   ``wsd_decay_steps``, ``wsd_decay_style``), turned into phases that give the same LR
   as megatron-core's ``OptimizerParamScheduler`` step for step (a test checks it).

In cases 1 and 2 the phases must cover exactly ``train.steps``; legacy phases keep
megatron's meaning (after the decay the LR stays at ``min_lr``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

from phoenix.config.schedule import PhaseConfig, ResolvedSchedule, ScheduleConfig, WeightDecayConfig, resolve
from phoenix.config.stage_table import StageTable, build_stage_table, stage_lr_phases
from phoenix.config.skip import check_skip_batches
from phoenix.config.typed import ConfigError

if TYPE_CHECKING:
    from phoenix.config.schema import RunConfig


@dataclass(frozen=True)
class ResolvedRun:
    """What a run config resolves to; immutable, computed once per config."""

    stages: StageTable
    """The stages on the step axis (one implicit stage ``main`` without ``stages:``)."""
    schedule_config: ScheduleConfig
    """The LR schedule as phases (explicit, joined from the stages, or from the legacy fields)."""
    schedule: ResolvedSchedule
    """``schedule_config`` on the step axis: the LR of every optimizer step."""
    explicit_schedule: bool
    """True when the phases come from ``optim.schedule`` or the stages (not legacy fields)."""

    @property
    def total_steps(self) -> int:
        return self.stages.total_steps

    def tokens_per_step(self, step: int) -> int:
        """Tokens of optimizer step ``step`` (0-based): its stage's batch x sequence length."""
        return self.stages.tokens_per_step(step)


def resolve_run(cfg: RunConfig) -> ResolvedRun:
    """Resolve ``cfg``'s stages and LR schedule; raises ConfigError naming the key."""
    table = build_stage_table(cfg)
    _refuse_unused_pack_groups(cfg, table)
    check_skip_batches(cfg.train.skip_batches, table.total_steps)
    explicit = uses_multi_phase(cfg)
    schedule_config = _schedule_config(cfg, table)
    schedule = resolve(schedule_config, table.tokens_per_step, prefix="optim.schedule",
                       total_steps=table.total_steps if explicit else None)
    return ResolvedRun(stages=table, schedule_config=schedule_config, schedule=schedule,
                       explicit_schedule=explicit)


def _refuse_unused_pack_groups(cfg: RunConfig, table) -> None:
    """``pack_groups`` cuts a grouped dataset: refused where it would be silently ignored."""
    for d, entry in enumerate(cfg.data.datasets):
        if not entry.pack_groups:
            continue
        key = f"data.datasets[{d}].pack_groups"
        if entry.min_document_tokens:
            raise ConfigError(f"{key}: dataset '{entry.display_name}' reads a "
                              f"min_document_tokens view, which has no groups to pack")
        if not any(st.group_mode[d] == "batch" for st in table.stages):
            raise ConfigError(f"{key}: dataset '{entry.display_name}' is never read with "
                              f"group_mode batch, so there are no groups to pack; set "
                              f"group_mode: batch (here or in a stage) or remove pack_groups")


def uses_multi_phase(cfg: RunConfig) -> bool:
    """True when the run's LR comes from phases (``optim.schedule`` or the stages' ``lr``)."""
    return cfg.optim.schedule is not None or any(st.lr is not None for st in (cfg.stages or []))


_PHASE_INDEX = re.compile(r"phases\[(\d+)\]")


def _stage_schedule(cfg: RunConfig, table: StageTable,
                    base: Optional[ScheduleConfig]) -> Optional[ScheduleConfig]:
    """The schedule joined from the stages' ``lr`` phases (None when they give none).

    LR errors are reported at the stage's own key (``stages[i].lr[j]``), not at the
    index in the joined list."""
    phases = stage_lr_phases(cfg, table)
    if phases is None:
        return None
    o = cfg.optim
    if base is not None and base.phases is not None:
        raise ConfigError("optim.schedule.phases: the stages give their own lr phases; leave "
                          "optim.schedule.phases out (keep peak_lr, min_lr, weight_decay there)")
    where = [(i, j) for i, st in enumerate(cfg.stages) for j in range(len(st.lr))]
    try:
        if base is None:
            return ScheduleConfig(phases=phases, peak_lr=o.lr, min_lr=o.min_lr,
                                  weight_decay=WeightDecayConfig(start=o.weight_decay))
        return ScheduleConfig(phases=phases, peak_lr=base.peak_lr, min_lr=base.min_lr,
                              weight_decay=base.weight_decay)
    except ConfigError as e:
        def at_stage(m):
            i, j = where[int(m.group(1))]
            return f"stages[{i}].lr[{j}]"
        raise ConfigError(_PHASE_INDEX.sub(at_stage, str(e), count=1)) from None


def _check_legacy_lengths(cfg: RunConfig, total: int) -> None:
    """Inconsistent legacy schedule lengths are errors (megatron clamps some of them
    silently, e.g. a decay that ends inside the warmup becomes a one-step LR drop)."""
    o = cfg.optim
    if o.warmup_steps > total:
        raise ConfigError(f"optim.warmup_steps: {o.warmup_steps} is longer than the run "
                          f"(train.steps {total}); the LR would never reach optim.lr")
    if o.decay_style == "constant":
        for key in ("decay_steps", "wsd_decay_steps"):
            if getattr(o, key):
                raise ConfigError(f"optim.{key}: not used with decay_style constant; remove it "
                                  f"or choose a decaying style")
        return
    decay_end = o.decay_steps or total
    if decay_end <= o.warmup_steps:
        key = "decay_steps" if o.decay_steps else "warmup_steps"
        raise ConfigError(
            f"optim.{key}: the decay would end at step {decay_end}, not after the warmup "
            f"({o.warmup_steps} steps); optim.decay_steps counts from step 0 and must exceed "
            f"optim.warmup_steps")
    if decay_end > total:
        raise ConfigError(
            f"optim.decay_steps: {decay_end} is past the end of the run (train.steps {total}), so "
            f"the decay would never finish; to end a job early keep decay_steps and set "
            f"train.stop_at_step instead")
    if o.decay_style != "WSD" and o.wsd_decay_steps:
        raise ConfigError(f"optim.wsd_decay_steps: only used with decay_style WSD "
                          f"(decay_style is {o.decay_style})")


# megatron's WSD decay styles -> decay shapes with the same curve.
_WSD_SHAPES = {"linear": "linear", "cosine": "cosine", "minus_sqrt": "1-sqrt"}


def _schedule_config(cfg: RunConfig, table: StageTable) -> ScheduleConfig:
    o = cfg.optim
    explicit = o.schedule
    staged = _stage_schedule(cfg, table, explicit) if cfg.stages else None
    if staged is not None:
        return staged
    if explicit is not None:
        if explicit.phases is None:
            raise ConfigError("optim.schedule.phases: required (or give every stage its lr phases)")
        return explicit
    return _legacy_schedule(cfg, table.total_steps)


def _legacy_schedule(cfg: RunConfig, total: int) -> ScheduleConfig:
    """The multi-phase equivalent of the legacy ``optim`` LR fields, equal to megatron's
    ``OptimizerParamScheduler`` with the same settings step for step."""
    o = cfg.optim
    warmup = o.warmup_steps
    _check_legacy_lengths(cfg, total)
    phases = [PhaseConfig(kind="warmup", steps=warmup, name="warmup")] if warmup > 0 else []
    if o.decay_style == "constant":
        if total > warmup:
            phases.append(PhaseConfig(kind="constant", steps=total - warmup, name="constant"))
    else:
        decay_end = o.decay_steps or total  # after the warmup: checked above
        if o.decay_style in ("linear", "cosine"):
            phases.append(PhaseConfig(kind="decay", steps=decay_end - warmup, target_lr=o.min_lr,
                                      shape=o.decay_style, name="decay"))
        else:  # WSD
            if o.wsd_decay_style not in _WSD_SHAPES:
                raise ConfigError(
                    f"optim.wsd_decay_style: megatron's {o.wsd_decay_style!r} WSD curve has no "
                    f"multi-phase equivalent (supported: {', '.join(_WSD_SHAPES)})")
            anneal_start = decay_end - o.wsd_decay_steps
            if anneal_start < warmup:
                raise ConfigError(
                    f"optim.wsd_decay_steps: the decay ({o.wsd_decay_steps} steps ending at step "
                    f"{decay_end}) would start inside the warmup ({warmup} steps)")
            if anneal_start > warmup:
                phases.append(PhaseConfig(kind="constant", steps=anneal_start - warmup,
                                          name="stable"))
            phases.append(PhaseConfig(kind="decay", steps=o.wsd_decay_steps, target_lr=o.min_lr,
                                      shape=_WSD_SHAPES[o.wsd_decay_style], name="decay"))
    if not phases:
        phases.append(PhaseConfig(kind="constant", steps=max(total, 1), name="constant"))
    return ScheduleConfig(
        phases=phases, peak_lr=o.lr, min_lr=o.min_lr,
        weight_decay=WeightDecayConfig(start=o.weight_decay, end=o.weight_decay, style="constant"))
