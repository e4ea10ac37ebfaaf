"""The ``optim`` section: Adam settings, the LR schedule, LR multipliers and freezing.

``ParamGroupRule`` and ``FreezeConfig`` choose parameters by global name (see
:mod:`phoenix.optim.param_groups`, which turns them into megatron param groups).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from typing import Iterable, Literal, Optional

from phoenix.config.schedule import ScheduleConfig
from phoenix.config.typed import ConfigError, positive


def _check_patterns(key: str, patterns, *, allow_empty: bool = False) -> None:
    if not isinstance(patterns, (list, tuple)) or (not patterns and not allow_empty):
        raise ConfigError(f"{key}: give a list of name patterns, e.g. ['embedding.*'], "
                          f"got {patterns!r}")
    for i, pattern in enumerate(patterns):
        if not isinstance(pattern, str) or not pattern.strip():
            raise ConfigError(f"{key}[{i}]: a pattern must be a non-empty string, got {pattern!r}")


@dataclass(kw_only=True)
class ParamGroupRule:
    """Parameters matching ``params`` train with the schedule's LR x ``lr_mult``."""

    params: list[str]
    """fnmatch globs on global parameter names (``embedding.*``, ``output_layer.weight``,
    ``decoder.layers.0.*``). Every pattern must match some parameter."""
    lr_mult: float = 1.0
    """LR multiplier (> 0). Weight decay, being decoupled (AdamW), scales with it."""
    name: Optional[str] = None
    """Label for logs and errors (default: the patterns)."""

    def __post_init__(self):
        _check_patterns("params", self.params)
        if (isinstance(self.lr_mult, bool) or not isinstance(self.lr_mult, (int, float))
                or not math.isfinite(self.lr_mult) or self.lr_mult <= 0):
            raise ConfigError(f"lr_mult: must be a finite number > 0, got {self.lr_mult!r} "
                              f"(to stop a parameter from training, use freeze)")
        self.lr_mult = float(self.lr_mult)

    @property
    def label(self) -> str:
        return self.name or ", ".join(self.params)


@dataclass(kw_only=True)
class FreezeConfig:
    """Freeze parameters by name for the first ``steps`` optimizer steps of the run."""

    params: list[str]
    """fnmatch globs on global parameter names of the parameters to freeze (``["*"]``:
    all of them, less ``exclude``)."""
    exclude: list[str] = field(default_factory=list)
    """Globs of parameters kept training although ``params`` matches them, e.g.
    ``["embedding.*", "output_layer.*"]``."""
    steps: int
    """Frozen for optimizer steps ``0..steps-1`` (0-based), trained from step ``steps`` on."""

    def __post_init__(self):
        _check_patterns("params", self.params)
        _check_patterns("exclude", self.exclude, allow_empty=True)
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps <= 0:
            raise ConfigError(f"steps: must be an integer > 0 (the number of optimizer steps "
                              f"to freeze for), got {self.steps!r}")

    def freezes(self, name: str) -> bool:
        """Whether the parameter with global name ``name`` is frozen."""
        return matches_any(name, self.params) and not matches_any(name, self.exclude)


def matches_any(name: str, patterns: Iterable[str]) -> bool:
    """Whether ``name`` matches one of the fnmatch globs ``patterns`` (case-sensitive)."""
    return any(fnmatchcase(name, p) for p in patterns)


@dataclass(kw_only=True)
class OptimConfig:
    lr: Optional[float] = None
    """Peak learning rate; defaults to model.reference_lr."""
    min_lr: Optional[float] = None
    """Floor of the decay; default 10% of lr (the seeds' convention)."""
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    """Global gradient-norm clip (0 disables)."""
    warmup_steps: int = 0
    decay_style: Literal["constant", "linear", "cosine", "WSD"] = "cosine"
    decay_steps: Optional[int] = None
    """Steps from 0 to the end of the decay; default train.steps."""
    wsd_decay_steps: Optional[int] = None
    wsd_decay_style: Literal["linear", "cosine", "exponential", "minus_sqrt"] = "linear"
    schedule: Optional[ScheduleConfig] = None
    """Multi-phase LR schedule (warmup/constant/decay phases, see phoenix.config.schedule).
    When set it defines the LR: lr and min_lr come from its peak_lr and min_lr, and
    warmup_steps, decay_steps and wsd_decay_steps must be left unset."""
    param_groups: list[ParamGroupRule] = field(default_factory=list)
    """LR multipliers by parameter-name pattern (first matching rule wins), e.g.
    ``[{params: ["embedding.*"], lr_mult: 2.0}]``; see phoenix.optim.param_groups."""
    freeze: Optional[FreezeConfig] = None
    """Freeze parameters by name pattern for the first ``steps`` optimizer steps (LR 0,
    gradients zeroed before the step), e.g. all but the embeddings."""

    def __post_init__(self):
        if self.schedule is not None:
            for key, value in (("lr", self.schedule.peak_lr), ("min_lr", self.schedule.min_lr)):
                mine = getattr(self, key)
                if mine is not None and mine != value:
                    name = "peak_lr" if key == "lr" else key
                    raise ConfigError(f"optim.{key}: {mine} conflicts with optim.schedule.{name} "
                                      f"{value}; set it in the schedule only")
            self.lr, self.min_lr = self.schedule.peak_lr, self.schedule.min_lr
            for key in ("warmup_steps", "decay_steps", "wsd_decay_steps"):
                if getattr(self, key):
                    raise ConfigError(f"optim.{key}: not used with optim.schedule "
                                      f"(its phases define the schedule)")
        positive("optim", lr=self.lr, decay_steps=self.decay_steps)
        if self.min_lr is not None and self.min_lr < 0:
            raise ConfigError(f"optim.min_lr: must be >= 0, got {self.min_lr}")
        if self.lr is not None and self.min_lr is not None and self.min_lr > self.lr:
            raise ConfigError(f"optim.min_lr: {self.min_lr} is above optim.lr {self.lr}")
        if self.warmup_steps < 0:
            raise ConfigError(f"optim.warmup_steps: must be >= 0, got {self.warmup_steps}")
        if self.decay_style == "WSD" and not self.wsd_decay_steps:
            raise ConfigError("optim.wsd_decay_steps: required with decay_style WSD")
