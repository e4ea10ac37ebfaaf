"""The ``eval`` section of a run config: held-out sets and when to evaluate them.

YAML::

    eval:
      interval: 500          # every N optimizer steps (0: only at the end)
      at_end: true           # also after the last step of the job
      max_samples: 256       # per set, spread evenly over the set (0: the whole set)
      micro_batch_size: 4    # default: train.micro_batch_size
      sets:
        - {name: web_val, prefix: /data/web_val_text_document}
        - {prefix: /data/code_val_text_document}     # name: the prefix's file name
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from phoenix.config.typed import ConfigError


@dataclass(kw_only=True)
class EvalSetConfig:
    """One held-out set: a megatron-core ``.bin/.idx`` prefix."""

    prefix: str
    name: Optional[str] = None
    """Name in logs and TensorBoard tags (``eval/<name>/loss``); default: the prefix's file
    name."""

    def __post_init__(self):
        if not self.prefix:
            raise ConfigError("prefix: must not be empty")
        if self.name is not None and (not self.name or "/" in self.name or self.name != self.name.strip()):
            raise ConfigError(f"name: {self.name!r} must be a non-empty name without '/' or "
                              f"surrounding spaces (it becomes a TensorBoard tag)")

    @property
    def display_name(self) -> str:
        return self.name or self.prefix.rstrip("/").split("/")[-1]


@dataclass(kw_only=True)
class EvalConfig:
    """Held-out evaluation: loss, perplexity, top-1/top-5 next-token accuracy per set."""

    sets: list[EvalSetConfig]
    interval: int = 0
    """Evaluate every N optimizer steps (0: not periodically)."""
    at_end: bool = True
    """Evaluate after the last step of the job (``train.steps`` or ``train.stop_at_step``)."""
    max_samples: int = 256
    """Samples (``data.seq_length`` tokens each) per set, spread evenly over the set;
    the same samples at every evaluation and every parallel layout. 0: the whole set."""
    micro_batch_size: Optional[int] = None
    """Eval micro-batch size (per data-parallel rank); default ``train.micro_batch_size``."""

    def __post_init__(self):
        if not self.sets:
            raise ConfigError("sets: at least one eval set is required")
        names = [s.display_name for s in self.sets]
        for i, name in enumerate(names):
            if name in names[:i]:
                raise ConfigError(f"sets[{i}].name: '{name}' is used twice; give each eval set "
                                  f"its own name")
        if self.interval < 0:
            raise ConfigError(f"interval: must be >= 0, got {self.interval}")
        if self.max_samples < 0:
            raise ConfigError(f"max_samples: must be >= 0 (0: the whole set), got {self.max_samples}")
        if self.micro_batch_size is not None and self.micro_batch_size <= 0:
            raise ConfigError(f"micro_batch_size: must be > 0, got {self.micro_batch_size}")
