"""Which elements of the model (and of the optimizer's state) each rank adds to a norm.

The per-layer norm monitors (:mod:`phoenix.monitor.norms` for gradients, weights and
updates; :mod:`phoenix.monitor.optimizer_state` for Adam's moments) report norms of the
full, unsharded model under any TP/PP/DP/EP layout. They share one recipe, written here
once: each rank adds the squares of the elements it *owns* into a fixed-order vector of
per-key sums (the keys are agreed on by every rank at start), and one
``all_reduce(SUM)`` over the world gathers them. The ownership rules (the slices are
disjoint and cover every element of the model exactly once):

* Tensor parallel: a ``tensor_model_parallel`` parameter is a shard, every TP rank adds
  its own; a duplicated one (norm weights) is added by TP rank 0 only.
* Pipeline parallel: each stage holds different layers (keys name global layers).
* Data parallel with the distributed optimizer: each DP rank adds the slice of every
  parameter its optimizer shard holds (``param_range_map["param"]``): that is where the
  reduced gradient, the fp32 main weight and the Adam state of those elements live.
  Without it every DP rank holds everything, and each parameter is added by one DP rank
  (round robin).
* Expert parallel: routed experts (``allreduce=False``) use the expert-data-parallel and
  expert-tensor groups in place of DP and TP.
* ``shared`` weights (the last stage's copy of a tied embedding) are skipped.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.distributed as dist


class OwnedSlice(NamedTuple):
    """Elements of one parameter that this rank adds, as 1-D tensors of equal length."""

    key: str
    """The norm key (``layer_07/attention/qkv``, ``embedding``, ...)."""
    grad: torch.Tensor
    """The reduced gradient of those elements."""
    weight: torch.Tensor
    """The tensor the optimizer updates in place (fp32 main weights when it keeps them,
    else the model parameter)."""
    main: torch.Tensor
    """The inner optimizer's own parameter tensor for these elements, the key of their
    state in ``optimizer.state`` (its whole state is exactly these elements)."""


def _group(layout, name: str) -> tuple[int, int]:
    """(rank, size) in megatron's group ``name`` of the layout (``(0, 1)`` if absent)."""
    group = getattr(layout.pg_collection, name, None)
    if group is None:
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def megatron_optimizers(optimizer) -> list:
    """The megatron optimizers behind ``optimizer`` (the parts of a ChainedOptimizer)."""
    return list(getattr(optimizer, "chained_optimizers", [optimizer]))


def owned_slices(trainer, entries) -> list[OwnedSlice]:
    """What this rank adds of ``entries`` (``(key, name, param)`` of its model chunks,
    the same list on every call), by the rules of the module docstring. Parameters
    without a gradient are left out."""
    layout = trainer.layout
    sharded = [o for o in megatron_optimizers(trainer.optimizer)
               if hasattr(o, "model_param_gbuf_map")]
    # Data x context parallel: the ranks megatron's grad buffers are sharded over.
    dense_dp = (layout.dp_cp_rank, layout.dp_cp_size)
    # Routed experts (``allreduce=False``) are replicated over the expert-data-parallel
    # group instead and split over the expert-tensor group (EP ranks hold different ones).
    expt_dp, expt_tp = (_group(layout, "expt_dp"), _group(layout, "expt_tp"))
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
        main = getattr(p, "main_param", None)
        if sharded:  # distributed optimizer: only the slice this DP rank owns
            opt = next((o for o in sharded if p in o.model_param_gbuf_map), None)
            if opt is None:
                continue  # no element of p falls in this rank's shard
            r = opt._get_model_param_range_map(p)["param"]
            weight = main if main is not None else p.detach().view(-1)[r.start:r.end]
            group, order = opt.model_param_group_index_map[p]
            shard = opt.optimizer.param_groups[group]["params"][order]
            owned.append(OwnedSlice(key, grad.view(-1)[r.start:r.end], weight.view(-1), shard))
        elif i % dp_size == dp_rank:  # full and all-reduced on every DP rank: each
            # parameter is added by one DP rank (round robin, to share the work)
            weight = main if main is not None else p.detach()
            owned.append(OwnedSlice(key, grad.view(-1), weight.view(-1),
                                    main if main is not None else p))
    return owned


def agree_keys(entries) -> list[str]:
    """The sorted union of every rank's keys (collective): each rank must reduce the same
    fixed-order vector, whatever keys its own pipeline stage or experts hold."""
    local = sorted({key for key, _, _ in entries})
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, local)
    return sorted(set().union(*map(set, gathered)))


def key_indices(owned, index: dict[str, int], device) -> torch.Tensor:
    """The position of each owned slice's key in the agreed vector."""
    return torch.tensor([index[o.key] for o in owned], dtype=torch.long, device=device)


def key_sums(tensors, indices: torch.Tensor, num_keys: int, device) -> torch.Tensor:
    """Per-key sums of squares (float64 ``[num_keys]``) of ``tensors``, one per owned
    slice (``indices`` from :func:`key_indices`)."""
    out = torch.zeros(num_keys, dtype=torch.float64, device=device)
    if len(tensors):
        norms = torch.stack([torch.linalg.vector_norm(t, dtype=torch.float32)
                             for t in tensors]).double()
        out.index_add_(0, indices, norms * norms)
    return out


def with_totals(squares: dict[str, float]) -> dict[str, float]:
    """``squares`` (key -> sum of squares) plus whole layers (``layer_07``: the sum of its
    parts) and ``global`` (the sum of every key)."""
    out = dict(squares)
    for key, v in squares.items():
        if key.startswith("layer_"):
            layer = key.split("/", 1)[0]
            out[layer] = out.get(layer, 0.0) + v
        out["global"] = out.get("global", 0.0) + v
    return out


def loss_scale(trainer) -> float:
    """The optimizer's loss scale (fp16: the gradients still carry it), else 1."""
    try:
        return float(trainer.optimizer.get_loss_scale())
    except Exception:
        return 1.0
