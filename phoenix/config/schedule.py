"""Multi-phase learning-rate schedule (config and its pure resolution onto the step axis).

The scheduler that applies it to an optimizer is :class:`phoenix.optim.schedule.MultiPhaseScheduler`;
this module only describes the schedule: warmup, constant and decay phases in any order.

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
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Optional, Union

from phoenix.config.typed import ConfigError

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
