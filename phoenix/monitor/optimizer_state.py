"""Per-layer norms of Adam's state in TensorBoard, under any TP/PP/DP/EP layout.

Every ``interval`` optimizer steps :class:`OptimizerStateNormMonitor` records, right after
the optimizer step, the L2 norms of the state that step used, per key of
:mod:`phoenix.monitor.norms` (``layer_07/attention/qkv``, ..., ``layer_07``, ``embedding``,
``final_norm``, ``output_layer``, ``global``), into the step's metrics collector on the
logging rank:

``adam_m_norm/<key>``
    ‖m‖, Adam's first moment (``exp_avg``), raw: not bias-corrected.
``adam_v_norm/<key>``
    ‖v‖, Adam's second moment (``exp_avg_sq``, in gradient units squared), raw.
``adam_direction_norm/<key>``
    ‖m̂ / (√v̂ + ε)‖ with m̂ = m / (1 - β1^t), v̂ = v / (1 - β2^t) and ``t`` the
    parameter's step count after this step: the direction this step moved the weights
    in, before the learning rate. This is the bias correction of torch's Adam/AdamW,
    apex's and Transformer Engine's FusedAdam (megatron's optimizers): the applied
    update is ``-lr * direction`` (plus, for AdamW, the decoupled weight decay
    ``-lr * wd * weight``, which is not part of the direction), so on parameters without
    weight decay (biases, norm weights) ``update_norm = lr * adam_direction_norm``.

Gradients enter the moments after clipping (and after the fp16 loss scale is removed),
so ``adam_m_norm`` at the first step is ``(1 - β1)`` times the clipped grad norm. The
direction's elements are about ±1 where the gradient is steady and near 0 where it is
noise, so ``adam_direction_norm / sqrt(numel)`` of a part says how consistent its
gradients are; ``adam_v_norm`` growing ahead of ``grad_norm`` is the usual sign of a part
whose updates are about to shrink.

Reduction: exactly as the grad norms (:mod:`phoenix.monitor.ownership`): each rank adds
the squares of the state of the elements it owns (with the distributed optimizer, the
state of its DP shard of every parameter, which is the whole of its optimizer's state;
without it, each parameter's full state on one DP rank), and one
``all_reduce(SUM)`` of three float64 values per key over the world gathers them.

Cost, on logging steps only: about 40 bytes of memory traffic per owned parameter (the
norms of ``m`` and ``v``, and the direction's four passes) and one temporary the size of
the largest owned parameter slice; one all-reduce. No state is kept between steps and nothing is written to the optimizer, so
logging cannot change training. Steps whose update was skipped are not logged.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from phoenix.monitor.norms import PartMonitor
from phoenix.monitor.ownership import (
    key_indices,
    key_sums,
    megatron_optimizers,
    owned_slices,
    with_totals,
)

FAMILIES = ("adam_m_norm", "adam_v_norm", "adam_direction_norm")


def adam_direction(state: dict, group: dict) -> torch.Tensor | None:
    """``m̂ / (√v̂ + ε)`` of one parameter's Adam ``state`` (after its step; ``group``: its
    param group, for ``betas``, ``eps`` and, with apex's FusedAdam, ``step``): torch's
    Adam applies ``(m / (√v / √(1 - β2^t) + ε)) / (1 - β1^t)``, computed here as the
    equal ``m / (√v + ε √(1 - β2^t)) * √(1 - β2^t) / (1 - β1^t)``. None when the parameter
    has no state yet (before its first step)."""
    found = _unscaled_direction(state, group)
    return None if found is None else found[0].mul_(found[1])


def _unscaled_direction(state: dict, group: dict) -> tuple[torch.Tensor, float] | None:
    """``(m / (√v + ε √(1 - β2^t)), √(1 - β2^t) / (1 - β1^t))``: the direction is their
    product. One new tensor, four passes over it (the scale is applied to the norm)."""
    step = state.get("step", group.get("step"))
    if step is None or "exp_avg" not in state:
        return None
    t = float(step)
    if t <= 0:
        return None
    beta1, beta2 = group["betas"]
    root_bc2 = math.sqrt(1 - beta2 ** t)
    denom = state["exp_avg_sq"].float().sqrt().add_(group["eps"] * root_bc2)
    return torch.div(state["exp_avg"].float(), denom, out=denom), root_bc2 / (1 - beta1 ** t)


class OptimizerStateNormMonitor(PartMonitor):
    """Logs ``adam_m_norm/``, ``adam_v_norm/``, ``adam_direction_norm/`` scalars.

    ``interval``: every N optimizer steps (0 disables), and the run's last step when
    ``log_last_step``. Recorded after the optimizer step on the logging rank; every rank
    must have the monitor (the reduction is collective). After a logged step, ``last``
    holds ``{tag: value}`` on the logging rank.
    """

    # Next to the NormMonitor (600): a producer, before the heatmaps (200) and the sinks.
    priority = 590

    def on_after_optimizer_step(self, trainer, grad_norm) -> None:
        if not self.due(trainer):
            return
        device = trainer.layout.device
        with torch.no_grad():
            owned = owned_slices(trainer, self._entries)
            where = _state_index(trainer.optimizer)
            kept, m, v, d = [], [], [], []
            for o in owned:
                found = where.get(id(o.main))
                state = found[0].state.get(o.main) if found else None
                direction = _unscaled_direction(state, found[1]) if state else None
                if direction is None:
                    continue
                kept.append(o)
                m.append(state["exp_avg"])
                v.append(state["exp_avg_sq"])
                # Its norm now: one temporary the size of a slice at a time.
                d.append(torch.linalg.vector_norm(direction[0], dtype=torch.float32)
                         * direction[1])
                del direction
            idx, k = key_indices(kept, self._index, device), len(self.keys)
            vector = torch.cat([key_sums(m, idx, k, device), key_sums(v, idx, k, device),
                                key_sums(d, idx, k, device)])
            dist.all_reduce(vector, op=dist.ReduceOp.SUM)  # the whole world: TP x PP x DP x EP
        if trainer.layout.is_logging_rank:
            self.last = self._tags(vector.cpu().tolist())
            trainer.metrics.record_many(self.last)

    def _tags(self, vector: list[float]) -> dict[str, float]:
        k = len(self.keys)
        tags = {}
        for i, family in enumerate(FAMILIES):
            squares = with_totals(dict(zip(self.keys, vector[i * k:(i + 1) * k])))
            tags.update({f"{family}/{key}": math.sqrt(max(v, 0.0)) for key, v in squares.items()})
        return tags


def _state_index(optimizer) -> dict[int, tuple[torch.optim.Optimizer, dict]]:
    """``id(param) -> (inner torch optimizer, param group)`` for every parameter the
    megatron optimizer(s) behind ``optimizer`` update."""
    out = {}
    for opt in megatron_optimizers(optimizer):
        inner = getattr(opt, "optimizer", None)
        for group in getattr(inner, "param_groups", []):
            for p in group["params"]:
                out[id(p)] = (inner, group)
    return out
