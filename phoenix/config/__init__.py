"""Typed run configuration: every section's dataclass, YAML loading, dotted overrides, and
the pure resolution of stages and LR phases onto the step axis (``cfg.resolved``).

A leaf of the package: nothing here imports any other part of phoenix.
"""

from phoenix.config.eval import EvalConfig, EvalSetConfig, NeedleConfig
from phoenix.config.loader import build_config, dump_config, load_config
from phoenix.config.moe import MoEConfig
from phoenix.config.monitoring import LoggingConfig, SpikeConfig
from phoenix.config.optim import FreezeConfig, OptimConfig, ParamGroupRule
from phoenix.config.performance import Fp8Config, FusionsConfig
from phoenix.config.resolved import ResolvedRun
from phoenix.config.rope import RopeConfig
from phoenix.config.schedule import PhaseConfig, ResolvedSchedule, ScheduleConfig, WeightDecayConfig
from phoenix.config.schema import (
    CheckpointConfig,
    DataConfig,
    DatasetEntry,
    ModelConfig,
    ParallelConfig,
    RunConfig,
    RuntimeConfig,
    TokenizerConfig,
    TrainConfig,
)
from phoenix.config.stage_table import ResolvedStage, StageTable
from phoenix.config.stages import ReplayConfig, StageConfig, StageDatasetConfig
from phoenix.config.typed import ConfigError, to_dict

__all__ = [
    "CheckpointConfig", "ConfigError", "DataConfig", "DatasetEntry", "EvalConfig", "EvalSetConfig",
    "Fp8Config", "FreezeConfig", "FusionsConfig", "LoggingConfig", "MoEConfig", "ModelConfig",
    "NeedleConfig", "OptimConfig",
    "ParallelConfig",
    "ParamGroupRule", "PhaseConfig", "ReplayConfig", "ResolvedRun", "ResolvedSchedule",
    "ResolvedStage", "RopeConfig", "RunConfig", "RuntimeConfig", "ScheduleConfig", "SpikeConfig",
    "StageConfig", "StageDatasetConfig", "StageTable", "TokenizerConfig", "TrainConfig", "WeightDecayConfig",
    "build_config", "dump_config", "load_config", "to_dict",
]
