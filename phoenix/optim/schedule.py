"""Multi-phase learning-rate schedule: warmup, constant and decay phases in any order.

A schedule is a list of phases run back to back ("more annealing stages: constant and
decay alternating several times"), e.g. warmup -> constant -> decay -> constant -> decay.

Units and conventions (the same as megatron-core's ``OptimizerParamScheduler``):

* Steps are optimizer steps, 0-based. ``lr_at(k)`` is the LR used by optimizer step ``k``.
  megatron's scheduler sets the LR for step 0 in its constructor (``step(0)``) and the
  trainer calls ``step(increment=1)`` after each optimizer step, so the LR used by step
  ``k`` is megatron's ``get_lr`` with ``num_steps == k``. ``MultiPhaseScheduler`` keeps
  exactly that protocol.
* A phase covers the steps ``[start, end)``. Its LR goes from ``start_lr`` at ``start``
  towards ``end_lr``, which is reached at ``end`` -- the first step of the next phase
  (or, after the last phase, every later step: the LR stays at the last value). So a
  10-step warmup uses 0, peak/10, ..., 9*peak/10 on steps 0..9 and the peak on step 10,
  as megatron does.
* Token lengths are converted to steps with ``ceil(tokens / tokens_per_step)``, using
  the tokens-per-step of the phase's first step: a phase never sees fewer tokens than
  asked, and overshoots by less than one step's worth.

LR chain (which LR each phase starts and ends at), fixed by the config alone:

* The LR "reached so far" starts at ``peak_lr`` (a schedule without warmup starts at
  the peak).
* ``warmup``: linear from ``start_lr`` (default 0) to ``lr`` (default ``peak_lr``). A
  warmup may appear anywhere (a re-warmup); its ``start_lr`` still defaults to 0, so set
  ``start_lr`` to continue from the current LR instead.
* ``constant``: ``lr`` (default: the LR reached so far).
* ``decay``: from the LR reached so far to ``target_lr`` (required), with ``shape``:
  ``linear``; ``cosine`` (half cosine); ``1-sqrt`` (lr = target + (start - target) *
  (1 - sqrt(progress))); ``exponential`` (geometric interpolation, needs target > 0).
  ``linear``, ``cosine`` and ``1-sqrt`` are megatron's ``linear``, ``cosine`` and WSD
  ``minus_sqrt``. megatron's WSD ``exponential`` is a different curve (an affine blend
  with coefficient ``2 * 0.5**progress - 1``) and has no equivalent here.
* Every LR lies in ``[min_lr, peak_lr]``, except a warmup's ``start_lr``, which may be
  lower (warmups usually start at 0 even with a non-zero floor).

Weight decay (optional ``weight_decay`` section) runs over the whole schedule from
``start`` to ``end`` with megatron's ``wd_incr_style`` formulas (``wd_incr_steps`` = the
schedule's total steps) and stays at ``end`` afterwards.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import logging
import math
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Optional, Union

from phoenix.config.typed import ConfigError

log = logging.getLogger(__name__)

PhaseKind = Literal["warmup", "constant", "decay"]
DecayShape = Literal["linear", "cosine", "1-sqrt", "exponential"]
WeightDecayStyle = Literal["constant", "linear", "cosine"]
TokensPerStep = Union[int, Callable[[int], int], None]

_KINDS = ("warmup", "constant", "decay")
_SHAPES = ("linear", "cosine", "1-sqrt", "exponential")
_WD_STYLES = ("constant", "linear", "cosine")


def _check_lr_value(key: str, value: Optional[float]) -> None:
    if value is not None and not (math.isfinite(value) and value >= 0):
        raise ConfigError(f"{key}: must be a finite number >= 0, got {value}")


# ----------------------------------------------------------------------------- config


@dataclass(kw_only=True)
class PhaseConfig:
    """One phase of a multi-phase LR schedule."""

    kind: PhaseKind
    """``warmup`` (linear rise), ``constant`` or ``decay``."""
    steps: Optional[int] = None
    """Length in optimizer steps. Give exactly one of ``steps`` and ``tokens``."""
    tokens: Optional[int] = None
    """Length in training tokens, converted to ``ceil(tokens / tokens_per_step)`` steps
    with the tokens-per-step at the phase's first step."""
    start_lr: Optional[float] = None
    """Warmup only: LR at the phase's first step (default 0)."""
    lr: Optional[float] = None
    """Constant: its LR (default: the LR reached so far). Warmup: the LR it rises to
    (default ``peak_lr``). Not allowed on a decay (use ``target_lr``)."""
    target_lr: Optional[float] = None
    """Decay only (required): LR reached at the end of the decay, >= ``min_lr``."""
    shape: DecayShape = "linear"
    """Decay only: ``linear``, ``cosine``, ``1-sqrt`` or ``exponential``."""
    name: Optional[str] = None
    """Label for tables, plots and the CSV (default: the kind)."""

    def __post_init__(self):
        # Messages name keys relative to this phase; from_dict prefixes ``phases[i]``.
        if self.kind not in _KINDS:
            raise ConfigError(f"kind: {self.kind!r} is not one of {', '.join(map(repr, _KINDS))}")
        if self.shape not in _SHAPES:
            raise ConfigError(f"shape: {self.shape!r} is not one of {', '.join(map(repr, _SHAPES))}")
        if (self.steps is None) == (self.tokens is None):
            got = "both" if self.steps is not None else "neither"
            raise ConfigError(f"steps: give exactly one of 'steps' and 'tokens' (got {got})")
        for key, value in (("steps", self.steps), ("tokens", self.tokens)):
            if value is not None and value <= 0:
                raise ConfigError(f"{key}: must be > 0 (a phase cannot be empty), got {value}")
        for key in ("start_lr", "lr", "target_lr"):
            _check_lr_value(key, getattr(self, key))
        if self.start_lr is not None and self.kind != "warmup":
            raise ConfigError(f"start_lr: only a warmup phase takes start_lr (this is a {self.kind})")
        if self.target_lr is not None and self.kind != "decay":
            raise ConfigError(f"target_lr: only a decay phase takes target_lr (this is a {self.kind})")
        if self.kind == "decay" and self.target_lr is None:
            raise ConfigError("target_lr: required for a decay phase")
        if self.kind == "decay" and self.lr is not None:
            raise ConfigError("lr: a decay phase starts at the LR reached so far and ends at "
                              "target_lr; 'lr' is for warmup and constant phases")
        if self.kind != "decay" and self.shape != "linear":
            raise ConfigError(f"shape: only a decay phase takes a shape (this is a {self.kind})")

    @property
    def label(self) -> str:
        return self.name or self.kind


@dataclass(kw_only=True)
class WeightDecayConfig:
    """Weight decay over the whole schedule (megatron's ``start_wd``/``end_wd``/``wd_incr_style``)."""

    start: float
    """Weight decay at step 0."""
    end: Optional[float] = None
    """Weight decay at the end of the schedule and after it (default: ``start``)."""
    style: WeightDecayStyle = "linear"
    """``constant`` (needs end == start), ``linear`` or ``cosine`` (megatron's rising half
    cosine) from start to end over the schedule's total steps."""

    def __post_init__(self):
        if self.end is None:
            self.end = self.start
        _check_lr_value("start", self.start)
        _check_lr_value("end", self.end)
        if self.style not in _WD_STYLES:
            raise ConfigError(f"style: {self.style!r} is not one of {', '.join(map(repr, _WD_STYLES))}")
        if self.style == "constant" and self.end != self.start:
            raise ConfigError(f"end: a constant weight decay needs end == start "
                              f"(got start {self.start}, end {self.end}); use style linear or cosine")


@dataclass(kw_only=True)
class ScheduleConfig:
    """A multi-phase LR schedule (and optionally a weight-decay schedule)."""

    phases: Optional[list[PhaseConfig]] = None
    """The phases, run back to back from step 0. Leave out when every stage of the run
    gives its own ``lr`` phases (they are then joined into this schedule)."""
    peak_lr: float
    """Highest LR of the schedule: where warmups end by default."""
    min_lr: float = 0.0
    """Floor: no LR (other than a warmup's start_lr) may be below it."""
    weight_decay: Optional[WeightDecayConfig] = None
    """Weight-decay schedule; None: a constant weight decay given by the optimizer config."""

    def __post_init__(self):
        if not (math.isfinite(self.peak_lr) and self.peak_lr > 0):
            raise ConfigError(f"peak_lr: must be > 0, got {self.peak_lr}")
        _check_lr_value("min_lr", self.min_lr)
        if self.min_lr > self.peak_lr:
            raise ConfigError(f"min_lr: {self.min_lr} is above peak_lr {self.peak_lr}")
        if self.phases is not None:
            if not self.phases:
                raise ConfigError("phases: at least one phase is required")
            lr_chain(self)  # LR errors surface when the config is loaded, not at step N.


def lr_chain(cfg: ScheduleConfig) -> list[tuple[float, float]]:
    """(start LR, end LR) of every phase; raises ConfigError naming ``phases[i].key``.

    Depends only on the config (not on lengths), so it is checked at load time.
    """
    chain = []
    current = cfg.peak_lr  # "the LR reached so far" before any phase
    for i, p in enumerate(cfg.phases):
        key = f"phases[{i}]"
        if p.kind == "warmup":
            start = 0.0 if p.start_lr is None else p.start_lr
            end = cfg.peak_lr if p.lr is None else p.lr
            _check_range(f"{key}.lr", end, cfg)
            if start > end:
                raise ConfigError(f"{key}.start_lr: {start} is above the LR the warmup rises to "
                                  f"({end}); a warmup cannot go down (use a decay)")
        elif p.kind == "constant":
            start = end = current if p.lr is None else p.lr
            _check_range(f"{key}.lr", end, cfg)
        else:
            start, end = current, p.target_lr
            if end > start:
                raise ConfigError(f"{key}.target_lr: {end} is above the LR at the start of the "
                                  f"decay ({start}); a decay cannot go up (use a warmup)")
            _check_range(f"{key}.target_lr", end, cfg)
            if p.shape == "exponential" and end <= 0:
                raise ConfigError(f"{key}.target_lr: an exponential decay needs target_lr > 0, "
                                  f"got {end}")
        chain.append((float(start), float(end)))
        current = end
    return chain


def _check_range(key: str, value: float, cfg: ScheduleConfig) -> None:
    if value > cfg.peak_lr:
        raise ConfigError(f"{key}: {value} is above peak_lr {cfg.peak_lr}")
    if value < cfg.min_lr:
        raise ConfigError(f"{key}: {value} is below min_lr {cfg.min_lr}")


# --------------------------------------------------------------------------- resolved


@dataclass(frozen=True)
class ResolvedPhase:
    """A phase placed on the step axis: it covers optimizer steps ``[start_step, end_step)``."""

    index: int
    kind: str
    label: str
    start_step: int
    end_step: int
    start_lr: float
    """LR at ``start_step``."""
    end_lr: float
    """LR at ``end_step`` (the first step after the phase)."""
    shape: Optional[str] = None
    """Decay shape; None for warmup and constant."""
    tokens: Optional[int] = None
    """Requested length in tokens (None when given in steps)."""
    tokens_per_step: Optional[int] = None
    """Tokens per step used to convert ``tokens`` (None when given in steps)."""

    @property
    def steps(self) -> int:
        return self.end_step - self.start_step

    def value(self, step: int, start_lr: float, end_lr: float) -> float:
        """LR at ``step`` (inside the phase) interpolating ``start_lr`` -> ``end_lr``.

        The endpoints are parameters so a param group with its own max_lr/min_lr can use
        rescaled ones. Expressions mirror megatron's term for term so results agree
        bit for bit, not just approximately.
        """
        if self.kind == "constant":
            return start_lr
        k, n = step - self.start_step, self.steps
        if self.kind == "warmup":
            return start_lr + (end_lr - start_lr) * float(k) / float(n)
        ratio = float(k) / float(n)
        if self.shape == "exponential":
            if start_lr == end_lr or start_lr <= 0:
                return start_lr
            return start_lr * math.pow(end_lr / start_lr, ratio)
        if self.shape == "linear":
            coeff = 1.0 - ratio
        elif self.shape == "cosine":
            coeff = 0.5 * (math.cos(math.pi * ratio) + 1.0)
        else:  # "1-sqrt"
            coeff = 1.0 - math.sqrt(ratio)
        return end_lr + coeff * (start_lr - end_lr)


@dataclass(frozen=True)
class ResolvedSchedule:
    """An immutable schedule on the step axis; ``lr_at`` is a pure function of the step."""

    phases: tuple[ResolvedPhase, ...]
    peak_lr: float
    min_lr: float
    wd_start: Optional[float] = None
    """Weight decay at step 0 (None: the schedule does not set weight decay)."""
    wd_end: Optional[float] = None
    wd_style: Optional[str] = None
    _starts: tuple[int, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        object.__setattr__(self, "_starts", tuple(p.start_step for p in self.phases))

    @property
    def total_steps(self) -> int:
        """Steps covered by the phases (the LR is constant from this step on)."""
        return self.phases[-1].end_step

    def phase_at(self, step: int) -> Optional[ResolvedPhase]:
        """The phase that contains optimizer step ``step``; None after the last phase."""
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        if step >= self.total_steps:
            return None
        return self.phases[bisect.bisect_right(self._starts, step) - 1]

    def lr_at(self, step: int, *, max_lr: Optional[float] = None,
              min_lr: Optional[float] = None) -> float:
        """LR used by optimizer step ``step`` (0-based).

        ``max_lr``/``min_lr``: a param group's own peak and floor (megatron's per-group
        overrides, e.g. a decoupled embedding LR). Each phase then interpolates between
        its endpoint LRs mapped piecewise-linearly with 0 -> 0, ``min_lr`` -> the group's
        min_lr, ``peak_lr`` -> the group's max_lr, which is what megatron does for its
        own schedules (warmup from init_lr=0 to the group's max_lr, decay from the
        group's max_lr to its min_lr).
        """
        phase = self.phase_at(step)
        rescale = self._rescaler(max_lr, min_lr)
        if phase is None:
            return rescale(self.phases[-1].end_lr)
        return phase.value(step, rescale(phase.start_lr), rescale(phase.end_lr))

    def _rescaler(self, max_lr: Optional[float], min_lr: Optional[float]) -> Callable[[float], float]:
        peak, floor = self.peak_lr, self.min_lr
        gmax = peak if max_lr is None else float(max_lr)
        gmin = floor if min_lr is None else float(min_lr)
        if gmax == peak and gmin == floor:
            return lambda x: x  # the common case stays exact

        def rescale(x: float) -> float:
            # Anchors first so the peak and floor map exactly (no rounding).
            if x == peak:
                return gmax
            if x == floor:
                return gmin
            if x > floor:
                return gmin + (x - floor) * (gmax - gmin) / (peak - floor)
            return x * gmin / floor  # only a warmup's start_lr is below the floor (floor > 0)

        return rescale

    def wd_at(self, step: int, *, start: Optional[float] = None,
              end: Optional[float] = None) -> Optional[float]:
        """Weight decay for optimizer step ``step``; None when the schedule sets none.

        ``start``/``end``: a param group's ``start_wd``/``end_wd`` overrides. Same
        formulas as megatron's ``get_wd`` with ``wd_incr_steps`` = ``total_steps``.
        """
        if self.wd_style is None:
            return None
        start_wd = self.wd_start if start is None else start
        end_wd = self.wd_end if end is None else end
        if step > self.total_steps or self.wd_style == "constant":
            return end_wd
        ratio = float(step) / float(self.total_steps)
        if self.wd_style == "linear":
            coeff = ratio
        else:  # cosine: megatron's rising half cosine
            coeff = 0.5 * (math.cos(math.pi * (1 - ratio)) + 1.0)
        return start_wd + coeff * (end_wd - start_wd)

    def boundaries(self) -> tuple[int, ...]:
        """First step of every phase, then ``total_steps``: ``(0, s1, ..., total)``."""
        return self._starts + (self.total_steps,)

    def describe(self) -> list[dict[str, Any]]:
        """Plain-data view of the phases (YAML/JSON safe)."""
        return [{"index": p.index, "label": p.label, "kind": p.kind, "start_step": p.start_step,
                 "end_step": p.end_step, "start_lr": p.start_lr, "end_lr": p.end_lr,
                 "shape": p.shape} for p in self.phases]

    def fingerprint(self) -> str:
        """Hash of everything that determines the LR/WD at any step (labels excluded:
        renaming a phase does not change the schedule)."""
        data = {
            "phases": [[p.kind, p.start_step, p.end_step, p.start_lr.hex(), p.end_lr.hex(), p.shape]
                       for p in self.phases],
            "peak_lr": self.peak_lr.hex(), "min_lr": self.min_lr.hex(),
            "wd": None if self.wd_style is None else [self.wd_start.hex(), self.wd_end.hex(),
                                                      self.wd_style],
        }
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]

    def phases_table(self) -> str:
        """Human-readable table of the phases (one line each)."""
        rows = [("#", "phase", "kind", "steps [start, end)", "length", "tokens", "lr")]
        for p in self.phases:
            lr = f"{p.start_lr:.4g}" if p.kind == "constant" else f"{p.start_lr:.4g} -> {p.end_lr:.4g}"
            if p.shape:
                lr += f" ({p.shape})"
            tokens = "" if p.tokens is None else f"{p.tokens:,} @ {p.tokens_per_step:,}/step"
            rows.append((str(p.index), p.label, p.kind, f"[{p.start_step}, {p.end_step})",
                         str(p.steps), tokens, lr))
        widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
        lines = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in rows]
        if self.wd_style is not None:
            lines.append(f"weight decay: {self.wd_start:g} -> {self.wd_end:g} ({self.wd_style}) "
                         f"over {self.total_steps} steps")
        return "\n".join(lines)


def _tokens_per_step_fn(tokens_per_step: TokensPerStep) -> Optional[Callable[[int], int]]:
    if tokens_per_step is None or callable(tokens_per_step):
        return tokens_per_step
    return lambda _step: tokens_per_step


def resolve(cfg: ScheduleConfig, tokens_per_step: TokensPerStep = None, *,
            total_steps: Optional[int] = None, prefix: str = "") -> ResolvedSchedule:
    """Place ``cfg``'s phases on the step axis.

    ``tokens_per_step``: tokens per optimizer step, or a function of the (0-based) step
    returning it -- evaluated at each token-length phase's first step, so stages with
    different batch sizes or sequence lengths can plug in. Only needed when a phase is
    given in tokens. ``total_steps``: when given, the phases must add up to exactly it.
    ``prefix``: the config section (e.g. ``optim.schedule``) for error messages.
    """
    where = f"{prefix}." if prefix else ""
    tps = _tokens_per_step_fn(tokens_per_step)
    try:
        chain = lr_chain(cfg)
    except ConfigError as e:
        raise ConfigError(f"{where}{e}") from None
    phases, start = [], 0
    for i, (p, (start_lr, end_lr)) in enumerate(zip(cfg.phases, chain)):
        per_step = None
        if p.steps is not None:
            n = p.steps
        else:
            if tps is None:
                raise ConfigError(f"{where}phases[{i}].tokens: converting tokens to steps needs "
                                  f"tokens_per_step")
            per_step = tps(start)
            if isinstance(per_step, bool) or not isinstance(per_step, int) or per_step <= 0:
                raise ConfigError(f"{where}phases[{i}].tokens: tokens_per_step at step {start} is "
                                  f"{per_step!r}; it must be a positive integer")
            n = -(-p.tokens // per_step)  # ceil: never fewer tokens than asked
        if n <= 0:
            raise ConfigError(f"{where}phases[{i}]: zero-length phase")
        phases.append(ResolvedPhase(
            index=i, kind=p.kind, label=p.label, start_step=start, end_step=start + n,
            start_lr=start_lr, end_lr=end_lr, shape=p.shape if p.kind == "decay" else None,
            tokens=p.tokens, tokens_per_step=per_step))
        start += n
    if total_steps is not None and start != total_steps:
        terms = " + ".join(f"{ph.label} {ph.steps}" for ph in phases)
        raise ConfigError(f"{where}phases: the phases add up to {start} steps ({terms} = {start}) "
                          f"but the run has {total_steps} steps")
    wd = cfg.weight_decay
    return ResolvedSchedule(
        phases=tuple(phases), peak_lr=float(cfg.peak_lr), min_lr=float(cfg.min_lr),
        wd_start=None if wd is None else float(wd.start),
        wd_end=None if wd is None else float(wd.end),
        wd_style=None if wd is None else wd.style)


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
                 on_schedule_change: Literal["error", "warn"] = "error") -> None:
        if resolved.wd_style is None and weight_decay is None:
            raise ValueError("MultiPhaseScheduler: the schedule has no weight_decay section; "
                             "pass weight_decay= (a constant)")
        if on_schedule_change not in ("error", "warn"):
            raise ValueError(f"on_schedule_change must be 'error' or 'warn', got {on_schedule_change!r}")
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
        if saved != mine:
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


# ------------------------------------------------------------------ run-config glue


def tokens_per_step_of(cfg) -> Callable[[int], int]:
    """Tokens per optimizer step of a RunConfig as a function of the step (global batch x
    sequence length of the stage that contains it)."""
    return cfg.stage_table().tokens_per_step


_PHASE_INDEX = re.compile(r"phases\[(\d+)\]")


def _stage_schedule(cfg, base: Optional[ScheduleConfig]) -> Optional[ScheduleConfig]:
    """The schedule joined from the stages' ``lr`` phases (None when they give none).

    LR errors are reported at the stage's own key (``stages[i].lr[j]``), not at the
    index in the joined list."""
    from phoenix.stages.table import stage_lr_phases

    phases = stage_lr_phases(cfg)
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


_WSD_SHAPES = {"linear": "linear", "cosine": "cosine", "minus_sqrt": "1-sqrt"}


def schedule_from_run_config(cfg) -> ScheduleConfig:
    """The run's schedule: ``cfg.optim.schedule`` if the schema has it and it is set,
    else the multi-phase equivalent of the legacy ``optim`` fields, matching what
    ``phoenix.optim.builder.build_scheduler`` gives megatron step for step.
    """
    o = cfg.optim
    explicit = getattr(o, "schedule", None)
    staged = _stage_schedule(cfg, explicit) if getattr(cfg, "stages", None) else None
    if staged is not None:
        return staged
    if explicit is not None:
        if explicit.phases is None:
            raise ConfigError("optim.schedule.phases: required (or give every stage its lr phases)")
        return explicit
    total, warmup = cfg.train.steps, o.warmup_steps
    phases = [PhaseConfig(kind="warmup", steps=warmup, name="warmup")] if warmup > 0 else []
    if o.decay_style == "constant":
        if total > warmup:
            phases.append(PhaseConfig(kind="constant", steps=total - warmup, name="constant"))
    else:
        # The same decay end as build_scheduler (megatron needs it past the warmup).
        decay_end = max(o.decay_steps or total, warmup + 1)
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


def uses_multi_phase(cfg) -> bool:
    """True when the run's LR comes from phases (``optim.schedule`` or the stages' ``lr``)."""
    return getattr(cfg.optim, "schedule", None) is not None or any(
        getattr(st, "lr", None) is not None for st in (getattr(cfg, "stages", None) or []))


def build_multi_phase_scheduler(cfg, optimizer, *,
                                on_schedule_change: Literal["error", "warn"] = "error"
                                ) -> MultiPhaseScheduler:
    """MultiPhaseScheduler for a RunConfig (``optim.schedule`` or the legacy fields).

    An explicit ``optim.schedule`` must add up to exactly ``train.steps`` (a schedule
    that ends early or late is almost always a mistake; the error lists the sum). The
    legacy fields keep megatron's meaning (the decay may end before ``train.steps``).
    """
    schedule = schedule_from_run_config(cfg)
    explicit = uses_multi_phase(cfg)
    resolved = resolve(schedule, tokens_per_step_of(cfg), prefix="optim.schedule",
                       total_steps=cfg.train.steps if explicit else None)
    return MultiPhaseScheduler(optimizer, resolved, weight_decay=cfg.optim.weight_decay,
                               on_schedule_change=on_schedule_change)
