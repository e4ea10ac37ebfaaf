"""Typed config of a multi-stage recipe: the ``stages:`` list of a run.

A stage is a stretch of training with its own data mixture, LR phases, sequence length
and batch size. Stages run back to back inside one job; the data plan of each stage
continues every dataset's sample stream where the previous stage left it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Optional, Union

from phoenix.config.rope import RopeConfig
from phoenix.config.schedule import PhaseConfig
from phoenix.config.typed import ConfigError


@dataclass(kw_only=True)
class StageDatasetConfig:
    """A dataset's use in one stage (a bare number in ``mixture`` is just the weight)."""

    weight: float
    min_share: Optional[float] = None
    """Burst share for this stage (see data.datasets[].min_share); default: the dataset's."""
    group_mode: Optional[Literal["none", "batch"]] = None
    """Whole-group packing in this stage; default: the dataset's (e.g. turn grouping on
    only for the annealing stages)."""

    def __post_init__(self):
        if not (math.isfinite(self.weight) and self.weight >= 0):
            raise ConfigError(f"weight: must be >= 0 and finite, got {self.weight}")
        if self.min_share is not None and not 0 <= self.min_share < 1:
            raise ConfigError(f"min_share: must be in [0, 1), got {self.min_share}")


@dataclass(kw_only=True)
class ReplayConfig:
    """Replay: ``fraction`` of the stage's samples follow an earlier stage's mixture."""

    fraction: float
    """Share of the stage drawn with the replayed stage's (expanded) weights, in (0, 1)."""
    stage: Optional[str] = None
    """Name of the earlier stage whose mixture is replayed (default: the previous one)."""

    def __post_init__(self):
        if not 0 < self.fraction < 1:
            raise ConfigError(f"fraction: must be in (0, 1), got {self.fraction}")


@dataclass(kw_only=True)
class StageConfig:
    """One stage of a multi-stage recipe."""

    name: Optional[str] = None
    """Label in logs, TensorBoard, the LR plot and checkpoints (default ``stage<i+1>``)."""
    steps: Optional[int] = None
    """Length in optimizer steps. Give exactly one of ``steps`` and ``tokens``."""
    tokens: Optional[int] = None
    """Length in training tokens: ``ceil(tokens / (global_batch_size * seq_length))`` steps
    of this stage."""
    mixture: dict[str, Union[float, StageDatasetConfig]]
    """Dataset name (from data.datasets) -> weight, or -> {weight, min_share, group_mode}.
    Weights are normalised; datasets not listed are not read in this stage."""
    replay: Optional[Union[float, ReplayConfig]] = None
    """``x`` or ``{fraction: x, stage: NAME}``: the stage's weights become
    ``x * (replayed stage's weights) + (1 - x) * (this mixture, normalised)``."""
    mixture_warmup_steps: int = 0
    """Move the weights linearly from the previous stage's to this stage's over the first
    N steps (every batch's counts are exact for its interpolated weights)."""
    seq_length: Optional[int] = None
    """Tokens per sample in this stage (default data.seq_length)."""
    global_batch_size: Optional[int] = None
    """Samples per step in this stage (default train.global_batch_size)."""
    lr: Optional[list[PhaseConfig]] = None
    """This stage's LR phases (warmup/constant/decay, as optim.schedule.phases); they must
    add up to the stage's length. Either every stage gives ``lr`` or none does."""
    rope: Optional[RopeConfig] = None
    """This stage's rotary embedding, a whole RopeConfig replacing ``model.rope`` for this
    stage only (stages without one use ``model.rope``): context extension, e.g. a larger
    ``base`` or a yarn ``factor`` with a longer ``seq_length``. The model's RoPE is switched
    when the stage begins (RoPE frequencies are not part of a checkpoint)."""
    data_seed: Optional[int] = None
    """Reshuffle every dataset from this stage's first step with this seed (instead of
    ``train.seed``; later stages keep it until one sets another): the samples of each
    dataset's current epoch not yet read are read in a new order before any sample of its
    next epoch (none twice, none skipped), and later epochs are permuted with this seed.
    The batches' mixture is unchanged. Refused for a dataset read whole-group
    (``group_mode: batch``) under a seed other than ``train.seed``."""

    def __post_init__(self):
        if (self.steps is None) == (self.tokens is None):
            got = "both" if self.steps is not None else "neither"
            raise ConfigError(f"steps: give exactly one of 'steps' and 'tokens' (got {got})")
        for key in ("steps", "tokens", "seq_length", "global_batch_size"):
            value = getattr(self, key)
            if value is not None and value <= 0:
                raise ConfigError(f"{key}: must be > 0, got {value}")
        if not self.mixture:
            raise ConfigError("mixture: at least one dataset is required")
        if self.mixture_warmup_steps < 0:
            raise ConfigError(f"mixture_warmup_steps: must be >= 0, got {self.mixture_warmup_steps}")
        if isinstance(self.replay, float):
            try:
                self.replay = ReplayConfig(fraction=self.replay)
            except ConfigError as e:
                raise ConfigError(f"replay.{e}") from None
        if self.lr is not None and not self.lr:
            raise ConfigError("lr: give at least one phase (or leave lr out)")

    def entries(self) -> dict[str, StageDatasetConfig]:
        """The mixture with bare weights turned into entries."""
        return {name: value if isinstance(value, StageDatasetConfig)
                else StageDatasetConfig(weight=float(value)) for name, value in self.mixture.items()}
