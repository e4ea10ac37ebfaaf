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
      needle:                # passkey retrieval (phoenix.eval.needle); runs with the sets
        haystack_prefix: /data/web_val_text_document
        lengths: [1024, 2048, 4096]   # default: powers of two from 1024 to the stage's seq
        depths: [0.0, 0.25, 0.5, 0.75, 1.0]
        trials: 4

``sets`` may be left out when ``needle`` is given (a needle-only evaluation).
"""

from __future__ import annotations

from dataclasses import dataclass, field
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


NEEDLE_TAG = "needle"
"""The TensorBoard name of the needle eval (``eval/needle/<length>``); no set may take it."""


@dataclass(kw_only=True)
class NeedleConfig:
    """Needle in a haystack (passkey retrieval): a random number is hidden at a given depth
    of filler text and the model must repeat it after a question (greedy decoding). See
    :mod:`phoenix.eval.needle` for the prompt format. Runs whenever the eval runs
    (``eval.interval``, ``eval.at_end``)."""

    haystack_prefix: str
    """A tokenised ``.bin/.idx`` prefix whose text is the filler (document separators are
    dropped; read from its start, wrapped around when it is too short)."""
    lengths: Optional[list[int]] = None
    """Context lengths in tokens (prompt plus the generated answer). Default: powers of
    two from 1024 up to the current stage's ``seq_length`` (and that length itself; just
    ``[seq_length]`` when it is below 1024)."""
    depths: list[float] = field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0])
    """Where the needle goes: the fraction of the haystack before it (0: at the start,
    1: right before the question)."""
    trials: int = 4
    """Prompts per (length, depth) cell, each with its own passkey and filler offset."""
    digits: int = 5
    """Digits of the passkey (its first digit is never 0)."""
    seed: int = 1234
    """Seeds the passkeys and filler offsets: the same prompts at every evaluation."""
    answer_tokens: Optional[int] = None
    """Tokens generated per prompt (greedy); default ``digits + 4``. Part of each length."""

    def __post_init__(self):
        if not self.haystack_prefix:
            raise ConfigError("haystack_prefix: must not be empty")
        if self.lengths is not None:
            if not self.lengths:
                raise ConfigError("lengths: must not be empty (leave it out for the default)")
            for i, n in enumerate(self.lengths):
                if n <= 0:
                    raise ConfigError(f"lengths[{i}]: must be > 0, got {n}")
            if len(set(self.lengths)) != len(self.lengths):
                raise ConfigError(f"lengths: {self.lengths} lists a length twice")
        if not self.depths:
            raise ConfigError("depths: must not be empty")
        for i, d in enumerate(self.depths):
            if not 0.0 <= d <= 1.0:
                raise ConfigError(f"depths[{i}]: must be in [0, 1], got {d}")
        if len(set(self.depths)) != len(self.depths):
            raise ConfigError(f"depths: {self.depths} lists a depth twice")
        if self.trials < 1:
            raise ConfigError(f"trials: must be >= 1, got {self.trials}")
        if not 1 <= self.digits <= 18:
            raise ConfigError(f"digits: must be in [1, 18], got {self.digits}")
        if self.answer_tokens is not None and self.answer_tokens < self.digits:
            raise ConfigError(f"answer_tokens: must be >= digits ({self.digits}), got "
                              f"{self.answer_tokens}")

    @property
    def new_tokens(self) -> int:
        """Tokens generated per prompt."""
        return self.answer_tokens if self.answer_tokens is not None else self.digits + 4


@dataclass(kw_only=True)
class EvalConfig:
    """Held-out evaluation: loss, perplexity, top-1/top-5 next-token accuracy per set."""

    sets: list[EvalSetConfig] = field(default_factory=list)
    """Held-out sets; may be empty when ``needle`` is given."""
    interval: int = 0
    """Evaluate every N optimizer steps (0: not periodically)."""
    at_end: bool = True
    """Evaluate after the last step of the job (``train.steps`` or ``train.stop_at_step``)."""
    max_samples: int = 256
    """Samples (of the current stage's seq_length) per set, spread evenly over the set;
    the same samples at every evaluation and every parallel layout. 0: the whole set."""
    micro_batch_size: Optional[int] = None
    """Eval micro-batch size (per data-parallel rank); default ``train.micro_batch_size``.
    Also the batch of the needle eval's greedy decoding."""
    needle: Optional[NeedleConfig] = None
    """Needle-in-a-haystack (passkey retrieval) evaluation; None: none."""

    def __post_init__(self):
        if not self.sets and self.needle is None:
            raise ConfigError("sets: at least one eval set is required (or eval.needle)")
        names = [s.display_name for s in self.sets]
        for i, name in enumerate(names):
            if name in names[:i]:
                raise ConfigError(f"sets[{i}].name: '{name}' is used twice; give each eval set "
                                  f"its own name")
            if name == NEEDLE_TAG and self.needle is not None:
                raise ConfigError(f"sets[{i}].name: '{NEEDLE_TAG}' is the needle eval's "
                                  f"TensorBoard name; give the set another name")
        if self.interval < 0:
            raise ConfigError(f"interval: must be >= 0, got {self.interval}")
        if self.max_samples < 0:
            raise ConfigError(f"max_samples: must be >= 0 (0: the whole set), got {self.max_samples}")
        if self.micro_batch_size is not None and self.micro_batch_size <= 0:
            raise ConfigError(f"micro_batch_size: must be > 0, got {self.micro_batch_size}")
