"""Atomic, reshardable checkpoints (megatron-core dist_checkpointing + trainer state)."""

from phoenix.checkpoint.manager import CheckpointError, CheckpointManager, find_latest

__all__ = ["CheckpointError", "CheckpointManager", "find_latest"]
