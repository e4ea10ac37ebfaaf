"""Which elements of the full model each rank counts, so a sum over the world sees every
element of every parameter exactly once, under any TP/PP/DP/EP layout.

The per-layer norms (phoenix.monitor.norms) and the weight/gradient histograms
(phoenix.monitor.histograms) both reduce over the whole world; both take their elements
from :func:`owned_slices`. The rules, as megatron's own ``get_grad_norm_fp32`` applies
them to the global norm:

* Tensor parallel: a parameter with ``tensor_model_parallel=True`` is a shard, every
  TP rank counts its own; a duplicated one (norm weights) is counted by TP rank 0 only.
* Pipeline parallel: each stage holds different layers and counts its own.
* Data parallel with the distributed optimizer: after ``finalize_model_grads`` only this
  rank's shard of each grad-buffer bucket holds reduced gradients (the rest holds local,
  unreduced partial sums; the buffers are sharded over the layout's ``dp_cp_group``,
  data x context parallel), so each DP rank counts the slice of every parameter it owns
  (``param_range_map["param"]`` of the optimizer's ``gbuf_ranges``); the slices are
  disjoint and cover every parameter once. Weights use the same slices (of the fp32 main
  shards). Without it, every DP rank holds full reduced gradients and weights, and each
  parameter is counted by one DP rank (round robin).
* Expert parallel: routed experts (``allreduce=False``) live on one EP rank each and are
  replicated over the *expert* data-parallel group (megatron's ``expt_dp``, whose grad
  buffers and distributed-optimizer shards are separate from the dense ones) and split
  over the expert-tensor group: the same rules with those groups in place of DP and TP.
* Weights marked ``shared`` (the last stage's copy of a tied embedding) are skipped,
  as megatron does, so they are counted once (under ``embedding``).
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def group_rank_size(layout, name: str) -> tuple[int, int]:
    """(rank, size) in megatron's group ``name`` of the layout (``(0, 1)`` if absent)."""
    group = getattr(layout.pg_collection, name, None)
    if group is None:
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def agreed_keys(entries) -> list[str]:
    """The sorted union over the world of the keys of ``entries`` (``(key, name, param)``
    of this rank): every rank reduces the same fixed-order vector. Collective."""
    local = sorted({key for key, _, _ in entries})
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, local)
    return sorted(set().union(*map(set, gathered)))


def owned_slices(trainer, entries) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """``(key, grad, weight)`` for the elements of ``entries`` (``(key, name, param)``)
    this rank counts, as 1-D views/tensors (see the module docstring).

    ``weight`` is the tensor the optimizer updates in place (fp32 main weights when it
    keeps them, else the model parameter); ``grad`` the reduced gradient of the same
    elements, as the optimizer is about to use it (fp16: still times the loss scale). A
    parameter without a gradient is left out.
    """
    layout = trainer.layout
    optimizers = getattr(trainer.optimizer, "chained_optimizers", [trainer.optimizer])
    sharded = [o for o in optimizers if hasattr(o, "model_param_gbuf_map")]
    # Data x context parallel: the ranks megatron's grad buffers are sharded over.
    dense_dp = (layout.dp_cp_rank, layout.dp_cp_size)
    # Routed experts (``allreduce=False``) are replicated over the expert-data-parallel
    # group instead and split over the expert-tensor group (EP ranks hold different ones).
    expt_dp, expt_tp = (group_rank_size(layout, "expt_dp"), group_rank_size(layout, "expt_tp"))
    owned = []
    for i, (key, _, p) in enumerate(entries):
        expert = not getattr(p, "allreduce", True)
        if getattr(p, "shared", False):
            continue  # the last stage's copy of a tied embedding: counted at the first
        tp_rank = expt_tp[0] if expert else layout.tp_rank
        if not getattr(p, "tensor_model_parallel", False) and tp_rank != 0:
            continue  # duplicated on every (expert) TP rank: count once
        dp_rank, dp_size = expt_dp if expert else dense_dp
        grad = getattr(p, "main_grad", None)
        if grad is None:
            grad = p.grad
        if grad is None:
            continue
        if sharded:  # distributed optimizer: only the slice this DP rank owns
            opt = next((o for o in sharded if p in o.model_param_gbuf_map), None)
            if opt is None:
                continue  # no element of p falls in this rank's shard
            r = opt._get_model_param_range_map(p)["param"]
            main = getattr(p, "main_param", None)
            weight = main if main is not None else p.detach().view(-1)[r.start:r.end]
            owned.append((key, grad.view(-1)[r.start:r.end], weight.view(-1)))
        elif i % dp_size == dp_rank:  # full and all-reduced on every DP rank: each
            # parameter is counted by one DP rank (round robin, to share the work)
            main = getattr(p, "main_param", None)
            weight = main if main is not None else p.detach()
            owned.append((key, grad.view(-1), weight.view(-1)))
    return owned


def loss_scale(trainer) -> float:
    """The optimizer's loss scale (fp16: the gradients still carry it), else 1."""
    try:
        return float(trainer.optimizer.get_loss_scale())
    except Exception:
        return 1.0
