"""Atomic, reshardable checkpoints (megatron-core dist_checkpointing + the state bundle).

* :mod:`phoenix.checkpoint.store`: the on-disk layout, atomic save, load, resharding.
* :mod:`phoenix.checkpoint.checkpointer`: cadence, retention, resume / init_from and the
  state bundle of a run (:class:`Checkpointer`).
* :mod:`phoenix.checkpoint.sharded_save`: megatron's sharded save, failing on every rank
  at once; :mod:`phoenix.checkpoint.save_failures`: the free-space check, the one-line
  error, the start-up sweep of unfinished saves.
* :mod:`phoenix.checkpoint.optimizer_format`: the distributed optimizer's on-disk format
  (``dp_reshardable`` / ``fully_reshardable``) and where each loads;
  :mod:`phoenix.checkpoint.reshard`: ``phoenix reshard``, dp_reshardable to fully_reshardable.
* :mod:`phoenix.checkpoint.trained_model`: a checkpoint's model with the RoPE it was
  trained with (:func:`load_model`), for evaluation and export.
"""

from phoenix.checkpoint.checkpointer import Checkpointer, RestorePlan, plan_restore
from phoenix.checkpoint.store import CheckpointError, CheckpointStore, find_latest
from phoenix.checkpoint.save_failures import CheckpointSaveError, sweep_unfinished_saves
from phoenix.checkpoint.trained_model import load_model, trained_stage

__all__ = ["CheckpointError", "CheckpointStore", "CheckpointSaveError", "Checkpointer",
           "RestorePlan", "find_latest", "load_model", "plan_restore", "sweep_unfinished_saves",
           "trained_stage"]
