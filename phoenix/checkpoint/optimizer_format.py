"""How a checkpoint holds the distributed optimizer's state, and where it can be loaded.

megatron-core 0.16.1's ``DistributedOptimizer.sharded_state_dict`` writes the state in the
format ``metadata["distrib_optim_sharding_type"]`` names. Phoenix offers two:

* ``dp_reshardable``: each rank writes the slices of the gradient buckets it owns, as they
  lie in memory (no gather, no copy: host memory during the save is bounded by the rank's
  own shard). The tensors are keyed by bucket, so the checkpoint loads at any
  data-parallel size but only with the TP/PP/CP/EP degrees and the bucket layout it was
  written with (megatron asserts ``per_bucket_numel_unpadded`` on load).
* ``fully_reshardable``: the state is gathered per parameter on every data-parallel rank
  (``get_parameter_state_dp_zero(return_on_all_ranks=True)``: the whole TP x PP shard of
  the fp32 state in host memory on every rank) and written in parameter shapes; it loads
  at any layout. Checkpoints written before the format was recorded are in it.

(``fully_sharded_model_space`` raises "ShardedTensor.flattened_range is not supported" on
save in 0.16.1; ``distrib_optim_fully_reshardable_mem_efficient`` gathers on DP rank 0 only,
which bounds no rank's memory by its own shard either.)

The state bundle records the format and the layout (:func:`layout_record`); a resume or
``init_optimizer`` at another layout is refused in one line naming ``phoenix reshard``
(:func:`layout_problem`), which rewrites the checkpoint as ``fully_reshardable``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

DP_RESHARDABLE = "dp_reshardable"
FULLY_RESHARDABLE = "fully_reshardable"
FORMATS = (DP_RESHARDABLE, FULLY_RESHARDABLE)
_DEGREES = ("tensor", "pipeline", "context", "expert", "expert_tensor")


def sharding_metadata(fmt: str) -> dict:
    """The ``metadata`` of megatron's ``sharded_state_dict`` for ``fmt``.

    ``chained_optim_avoid_prefix`` (fully_reshardable only): with expert parallelism megatron
    chains a dense and an expert optimizer and would prefix their keys ``chained_0.`` /
    ``chained_1.``; without the prefix the keys are the parameters' own, so EP=2 state
    loads at EP=1. dp_reshardable keys name the data-parallel group and bucket, which the
    two chained optimizers share, so they keep the prefix (and the layout is fixed anyway)."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown optimizer format {fmt!r} (one of {', '.join(FORMATS)})")
    return {"distrib_optim_sharding_type": fmt,
            "chained_optim_avoid_prefix": fmt == FULLY_RESHARDABLE}


def bucket_layout(optimizer) -> list:
    """``per_bucket_numel_unpadded`` of each chained part of ``optimizer``, in plain
    lists (the elements of each gradient bucket, without the padding to a DP multiple:
    independent of the data-parallel size; megatron's dp_reshardable load asserts it)."""
    parts = getattr(optimizer, "chained_optimizers", [optimizer])
    return [[[list(v) for v in buf.values()] for buf in getattr(p, "per_bucket_numel_unpadded", [])]
            for p in parts]


def layout_record(parallel, optimizer) -> dict:
    """What a dp_reshardable checkpoint must be loaded with: the parallel degrees
    (``parallel``: the run's ParallelConfig) and this rank's bucket layout."""
    degrees = {k: getattr(parallel, k) for k in _DEGREES}
    degrees["expert_tensor"] = degrees["expert_tensor"] or degrees["tensor"]
    return {"degrees": degrees, "buckets": bucket_layout(optimizer)}


def saved_format(bundle: dict) -> str:
    """The optimizer format of a checkpoint from its state bundle (older checkpoints:
    fully_reshardable, the only format phoenix wrote before it was recorded)."""
    return bundle.get("optimizer_format", FULLY_RESHARDABLE)


def _describe(degrees: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in degrees.items())


def layout_problem(bundle: dict, path: Path, parallel, optimizer: Optional[object] = None) -> Optional[str]:
    """One line saying why the optimizer state of checkpoint ``path`` (its ``bundle``)
    cannot be loaded at this run's layout (``parallel``; and ``optimizer``'s buckets when
    given), or None when it can (any fully_reshardable checkpoint can)."""
    if saved_format(bundle) != DP_RESHARDABLE or not bundle.get("has_optimizer", True):
        return None
    saved = bundle.get("optimizer_layout") or {}
    mine = layout_record(parallel, optimizer if optimizer is not None else object())
    what = None
    if saved.get("degrees") != mine["degrees"]:
        what = (f"parallel {_describe(saved.get('degrees', {}))}; this run has "
                f"{_describe(mine['degrees'])}")
    elif optimizer is not None and saved.get("buckets") != mine["buckets"]:
        what = ("gradient buckets of other sizes (parallel.bucket_size or "
                "parallel.overlap_grad_reduce differ)")
    if what is None:
        return None
    run = path.parent.parent if path.parent.name == "checkpoints" else path
    return (f"checkpoint {path} holds the optimizer state as dp_reshardable (loads at any "
            f"data-parallel size, only at its own layout), saved with {what}: convert it once "
            f"with `phoenix reshard {run} --out {run}` (rewrites it as fully_reshardable, loadable "
            f"at any layout), or resume with the saved layout")

