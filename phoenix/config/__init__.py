"""Typed run configuration: schema, YAML loading and dotted overrides."""

from phoenix.config.loader import build_config, dump_config, load_config
from phoenix.config.schema import (
    CheckpointConfig,
    DataConfig,
    DatasetEntry,
    LoggingConfig,
    ModelConfig,
    OptimConfig,
    ParallelConfig,
    RunConfig,
    RuntimeConfig,
    TokenizerConfig,
    TrainConfig,
)
from phoenix.config.typed import ConfigError, to_dict

__all__ = [
    "CheckpointConfig", "ConfigError", "DataConfig", "DatasetEntry", "LoggingConfig", "ModelConfig",
    "OptimConfig", "ParallelConfig", "RunConfig", "RuntimeConfig", "TokenizerConfig", "TrainConfig",
    "build_config", "dump_config", "load_config", "to_dict",
]
