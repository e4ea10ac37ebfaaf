"""Atomic, reshardable checkpoints (megatron-core dist_checkpointing + the state bundle).

* :mod:`phoenix.checkpoint.manager`: the on-disk layout, atomic save, load, resharding.
* :mod:`phoenix.checkpoint.checkpointer`: cadence, retention, resume / init_from and the
  state bundle of a run (:class:`Checkpointer`).
"""

from phoenix.checkpoint.checkpointer import Checkpointer, RestorePlan, plan_restore
from phoenix.checkpoint.manager import CheckpointError, CheckpointManager, find_latest

__all__ = ["CheckpointError", "CheckpointManager", "Checkpointer", "RestorePlan", "find_latest",
           "plan_restore"]
