"""Multi-stage recipes: stage config, the stage table, and per-stage data plans."""

from phoenix.stages.config import ReplayConfig, StageConfig, StageDatasetConfig
from phoenix.stages.table import ResolvedStage, StageTable, build_stage_table

__all__ = ["ReplayConfig", "ResolvedStage", "StageConfig", "StageDatasetConfig", "StageTable",
           "build_stage_table"]
