"""The one LR / weight-decay scheduler of a run: a multi-phase schedule applied to the optimizer.

The schedule itself (phases, their resolution onto the step axis) is config and lives in
:mod:`phoenix.config.schedule`; the run's resolved schedule is ``cfg.resolved.schedule``.
megatron-core's ``OptimizerParamScheduler`` is used only as a test oracle: the legacy
``optim`` fields (warmup_steps, decay_style, ...) become phases when the config is
resolved, step for step equal to what megatron's scheduler would give.
"""

from __future__ import annotations

import logging
from typing import Literal, Optional

from phoenix.config.schedule import ResolvedSchedule
from phoenix.config.typed import ConfigError

log = logging.getLogger(__name__)

# -------------------------------------------------------------------------- scheduler


class ScheduleMismatchError(ConfigError):
    """A checkpoint was written with a different schedule than the configured one."""


class MultiPhaseScheduler:
    """Drop-in for megatron's ``OptimizerParamScheduler`` driven by a ResolvedSchedule.

    Same protocol: the constructor sets the LR for step 0; call ``step(increment=1)``
    after each optimizer step. Each param group gets

    * ``lr`` = ``lr_at(num_steps)`` (rescaled to the group's ``max_lr``/``min_lr`` when
      they differ from the schedule's, as megatron honours them) x ``lr_mult``.
      megatron-core 0.16's own scheduler ignores ``lr_mult`` (its param groups always
      carry 1.0); it is multiplied here for custom param groups. A group with
      ``frozen_steps`` > ``num_steps`` gets 0 instead (see ``phoenix.optim.param_groups``).
    * ``weight_decay`` = the schedule's weight decay (the group's ``start_wd``/``end_wd``
      overrides honoured), or the constant ``weight_decay`` argument when the schedule
      has none, x ``wd_mult`` -- like megatron, which relies on this to zero the decay
      of biases and norms (``wd_mult=0``).

    Resume: ``state_dict()`` stores ``num_steps`` and the schedule's fingerprint. If a
    checkpoint's fingerprint differs from the configured schedule, ``load_state_dict``
    raises ScheduleMismatchError (``on_schedule_change="error"``, the default), or with
    ``"accept"`` continues silently (the trainer's resume contract has judged the change);
    ``"warn"`` logs a warning listing both schedules and continues with the configured
    one at the saved step (for deliberate changes, e.g. appending a decay stage). It is
    never applied silently. Unlike megatron (whose ``load_state_dict`` adds the saved
    step count to the current one), the step count is restored absolutely.

    Each group's ``frozen_steps`` is read when the scheduler is built (build it before
    loading a checkpoint into the optimizer) and written back at every ``step``: a
    checkpoint load replaces the optimizer's group dicts with the saved ones, matched by
    megatron on (wd_mult, lr_mult, is_expert_parallel, is_decoupled_lr) only, so a
    frozen group and an unfrozen one with the same multipliers can swap them.
    """

    FORMAT = "phoenix.multi_phase_lr/1"
    FROZEN_STEPS_KEY = "frozen_steps"
    """Param-group key: the group's LR is 0 while ``num_steps`` is below its value."""

    def __init__(self, optimizer, resolved: ResolvedSchedule, *,
                 weight_decay: Optional[float] = None,
                 on_schedule_change: Literal["error", "warn", "accept"] = "error") -> None:
        if resolved.wd_style is None and weight_decay is None:
            raise ValueError("MultiPhaseScheduler: the schedule has no weight_decay section; "
                             "pass weight_decay= (a constant)")
        if on_schedule_change not in ("error", "warn", "accept"):
            raise ValueError(f"on_schedule_change must be 'error', 'warn' or 'accept', got "
                             f"{on_schedule_change!r}")
        self.optimizer = optimizer
        self.resolved = resolved
        self.weight_decay = weight_decay
        self.on_schedule_change = on_schedule_change
        self.num_steps = 0
        self._frozen_steps = [int(g.get(self.FROZEN_STEPS_KEY, 0)) for g in optimizer.param_groups]
        self._check_groups()
        self.step(0)

    def _check_groups(self) -> None:
        # megatron puts max_lr=config.lr, min_lr=config.min_lr on every group and marks
        # groups without LR overrides default_config=True. If those disagree with the
        # schedule, the optimizer was built from other LR settings: rescaling would
        # silently change the schedule, so refuse.
        r = self.resolved
        for i, group in enumerate(self.optimizer.param_groups):
            if not group.get("default_config", False):
                continue
            gmax, gmin = group.get("max_lr", r.peak_lr), group.get("min_lr", r.min_lr)
            if gmax != r.peak_lr or gmin != r.min_lr:
                raise ValueError(
                    f"MultiPhaseScheduler: param group {i} (no LR override) has max_lr={gmax}, "
                    f"min_lr={gmin} but the schedule has peak_lr={r.peak_lr}, "
                    f"min_lr={r.min_lr}; build the optimizer with lr=peak_lr, min_lr=min_lr")

    def get_lr(self, param_group: dict) -> float:
        """LR for ``param_group`` at the current step, including ``lr_mult``; 0 while
        the group is frozen (also stopping AdamW's decoupled weight decay)."""
        if param_group.get(self.FROZEN_STEPS_KEY, 0) > self.num_steps:
            return 0.0
        lr = self.resolved.lr_at(self.num_steps, max_lr=param_group.get("max_lr"),
                                 min_lr=param_group.get("min_lr"))
        return lr * param_group.get("lr_mult", 1.0)

    def base_lr(self) -> float:
        """The schedule's LR at the current step, before any group's multiplier or
        freeze (the first param group may have either): what to log as "the" LR."""
        return self.resolved.lr_at(self.num_steps)

    def get_wd(self, param_group: dict) -> float:
        """Weight decay for ``param_group`` at the current step, before ``wd_mult``."""
        wd = self.resolved.wd_at(self.num_steps, start=param_group.get("start_wd"),
                                 end=param_group.get("end_wd"))
        return self.weight_decay if wd is None else wd

    def step(self, increment: int) -> None:
        """Advance by ``increment`` optimizer steps and set every group's lr and weight_decay."""
        if increment < 0:
            raise ValueError(f"increment must be >= 0, got {increment}")
        self.num_steps += increment
        groups = self.optimizer.param_groups
        if len(groups) != len(self._frozen_steps):
            raise ValueError(f"MultiPhaseScheduler: the optimizer has {len(groups)} param groups, "
                             f"it had {len(self._frozen_steps)} when the scheduler was built")
        for group, frozen_steps in zip(groups, self._frozen_steps):
            if frozen_steps:
                group[self.FROZEN_STEPS_KEY] = frozen_steps
            else:
                group.pop(self.FROZEN_STEPS_KEY, None)
            group["lr"] = self.get_lr(group)
            group["weight_decay"] = self.get_wd(group) * group.get("wd_mult", 1.0)

    def state_dict(self) -> dict:
        return {"format": self.FORMAT, "num_steps": self.num_steps,
                "schedule_fingerprint": self.resolved.fingerprint(),
                "phases": self.resolved.describe()}

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore the step count; a different saved schedule is reported, never silently used."""
        saved = state_dict.get("schedule_fingerprint")
        mine = self.resolved.fingerprint()
        if saved != mine and self.on_schedule_change != "accept":
            message = self._mismatch_message(state_dict, mine)
            if self.on_schedule_change == "error":
                raise ScheduleMismatchError(message)
            log.warning("%s; continuing with the configured schedule", message)
        self.num_steps = int(state_dict["num_steps"] if "num_steps" in state_dict
                             else state_dict["num_iters"])
        self.step(0)

    def _mismatch_message(self, state_dict: dict, mine: str) -> str:
        step = state_dict.get("num_steps", state_dict.get("num_iters"))
        if "schedule_fingerprint" not in state_dict:
            old = ("the checkpoint's scheduler state has no multi-phase schedule (written by "
                   f"megatron's OptimizerParamScheduler, lr_decay_style="
                   f"{state_dict.get('lr_decay_style')!r})")
        else:
            old_rows = "\n".join(
                f"  {p['index']} {p['label']} {p['kind']} [{p['start_step']}, {p['end_step']}) "
                f"{p['start_lr']:.4g} -> {p['end_lr']:.4g}" for p in state_dict.get("phases", []))
            old = (f"the checkpoint (step {step}) was trained with schedule "
                   f"{state_dict['schedule_fingerprint']}:\n{old_rows}")
        return (f"optim.schedule: LR schedule changed since the checkpoint: {old}\n"
                f"the config gives schedule {mine}:\n{self.resolved.phases_table()}\n"
                f"(to continue with the new schedule from step {step}, allow schedule changes: "
                f"on_schedule_change='warn')")


def build_multi_phase_scheduler(cfg, optimizer, *,
                                on_schedule_change: Literal["error", "warn", "accept"] = "accept"
                                ) -> MultiPhaseScheduler:
    """The run's scheduler: ``cfg.resolved.schedule`` (from ``optim.schedule``, the
    stages' ``lr`` phases or the legacy ``optim`` fields, resolved once with the config)
    applied to ``optimizer``. A schedule that differs from a resumed checkpoint's is
    accepted here: the resume contract (phoenix.checkpoint.resume_contract) has already
    refused every change that alters a step already trained, and logged and recorded the
    ones it honours."""
    return MultiPhaseScheduler(optimizer, cfg.resolved.schedule,
                               weight_decay=cfg.optim.weight_decay,
                               on_schedule_change=on_schedule_change)
