"""Per-layer gradient, parameter and update norms in TensorBoard, under any TP/PP/DP/EP layout.

Every ``interval`` optimizer steps :class:`NormMonitor` records L2 norms, reduced over
the whole world, so that the numbers are those of the full (unsharded) model, into the
step's metrics collector right after the optimizer step (on the logging rank; the
TensorBoard sink writes them, and the spike monitor reads them there):

``grad_norm/<key>``
    Gradients as the optimizer is about to use them: reduced over data parallel,
    scaled by 1/tokens, fp16 loss scale removed, **before** clipping.
``param_norm/<key>``
    The weights those gradients were computed at, i.e. before this step's update
    (the optimizer's fp32 main copy when it keeps one, e.g. bf16 training).
``update_norm/<key>``
    The change this step applied to the (main) weights: ``param_after - param_before``.
``update_ratio/<key>``
    ``update_norm / param_norm`` (not logged for a part whose weights are all zero).

Keys, with layers numbered globally (megatron's 1-based ``layer_number`` minus one,
zero-padded to at least two digits, whatever the pipeline stage that holds them)::

    layer_07                          the whole transformer layer
    layer_07/attention/qkv            linear_qkv (and its bias; q/kv projections of MLA)
    layer_07/attention/proj           linear_proj
    layer_07/mlp/fc1   layer_07/mlp/fc2
    layer_07/norms                    the layer's RMSNorm/LayerNorm weights (also qk-norm
                                      and Transformer Engine's fused layer_norm_weight)
    layer_07/mlp/router               MoE layers: the router (weight, expert bias)
    layer_07/mlp/expert_05/fc1        routed expert 5 (global id: local expert j of EP rank
    layer_07/mlp/expert_05/fc2        r is r * E / EP + j), whichever rank holds it
    layer_07/mlp/shared/fc1   .../shared/fc2   .../shared/gate    the shared experts
    layer_07/other                    anything else in the layer (only if present)
    embedding   final_norm   output_layer   other (only if present)
    global                            all parameters

The step index is the one ``1_train/loss`` uses (steps completed after the step).

How the values are reduced (as megatron's own ``get_grad_norm_fp32`` does for the
global norm; the rules live in :mod:`phoenix.monitor.ownership`, shared with the
optimizer-state norms of :mod:`phoenix.monitor.optimizer_state`): each rank adds the squares of the elements it *owns* into a fixed-order
vector of per-key sums, and one ``all_reduce(SUM)`` over the world gathers them.

* Tensor parallel: a parameter with ``tensor_model_parallel=True`` is a shard, every
  TP rank adds its own; a duplicated one (norm weights) is added by TP rank 0 only.
* Pipeline parallel: each stage owns different layers; keys come from the module
  structure (``layer_number`` is global) and are agreed on by all ranks once at start.
* Data parallel with the distributed optimizer: after ``finalize_model_grads`` only this
  rank's shard of each grad-buffer bucket holds reduced gradients (the rest holds local,
  unreduced partial sums; the buffers are sharded over the layout's ``dp_cp_group``,
  data x context parallel), so each DP rank adds the slice of every parameter it owns
  (``param_range_map["param"]`` of the optimizer's ``gbuf_ranges``); the slices are
  disjoint and cover every parameter once. Parameter and update norms use the same
  slices (of the fp32 main shards). Without it, every DP rank holds full reduced
  gradients and weights, and each parameter is added by one DP rank (round robin).
* Expert parallel: routed experts (``allreduce=False``) live on one EP rank each and are
  replicated over the *expert* data-parallel group (megatron's ``expt_dp``, whose grad
  buffers and distributed-optimizer shards are separate from the dense ones) and split
  over the expert-tensor group: the same rules with those groups in place of DP and TP.
  The sum over the world then counts every expert once, as megatron's global norm does.
* Weights marked ``shared`` (the last stage's copy of a tied embedding) are skipped,
  as megatron does, so they are counted once (under ``embedding``).

Nothing is done outside logging steps. On logging steps the monitor only reads
gradients and weights (one snapshot of this rank's owned main-weight slices is kept
between the two hooks to measure the update), so it cannot change training.
"""

from __future__ import annotations

import logging
import math

import torch
import torch.distributed as dist

from phoenix.monitor.base import Callback
from phoenix.monitor.ownership import (agree_keys, key_indices, key_sums, loss_scale, owned_slices,
                                       with_totals)

log = logging.getLogger(__name__)

FAMILIES = ("grad_norm", "param_norm", "update_norm", "update_ratio")
_ATTENTION = ("self_attention", "cross_attention")


def expert_key(expert: int, num_experts: int) -> str:
    """``expert_03``: a global expert id, zero-padded like :func:`layer_key`."""
    width = max(2, len(str(max(num_experts - 1, 0))))
    return f"expert_{expert:0{width}d}"


def _fc(parts: list[str]) -> str:
    for fc in ("fc1", "fc2"):
        if any(p == f"linear_{fc}" or p.startswith(f"linear_{fc}.") for p in parts):
            return fc
    return "other"


def layer_part(name: str, expert_ids: list[int] | None = None, num_experts: int = 0) -> str:
    """The part of a transformer layer a parameter belongs to, from its name inside the
    layer (e.g. ``self_attention.linear_qkv.weight`` -> ``attention/qkv``).

    MoE layers: routed expert ``j`` of this rank (``mlp.experts.local_experts.j.*``, or
    TE's grouped ``mlp.experts.linear_fc1.weight<j>``) is ``mlp/expert_<id>/fc1|fc2`` with
    its global id ``expert_ids[j]`` (megatron's ``local_expert_indices``; None: ``j``);
    ``mlp/router`` (weight and expert bias), ``mlp/shared/fc1|fc2|gate`` for the shared
    experts, and ``mlp/experts/fc1|fc2`` for the legacy GroupedMLP's stacked weights.
    """
    parts = name.split(".")
    if "norm" in name.lower():  # input_layernorm, pre_mlp_layernorm, q/k_layernorm,
        return "norms"          # TE's linear_qkv.layer_norm_weight, linear_fc1.layer_norm_bias
    if parts[0] in _ATTENTION:
        return "attention/proj" if "linear_proj" in parts else "attention/qkv"
    if parts[0] != "mlp":
        return "other"
    if len(parts) > 1 and parts[1] == "router":
        return "mlp/router"
    if len(parts) > 1 and parts[1] == "shared_experts":
        return "mlp/shared/gate" if "gate_weight" in parts else f"mlp/shared/{_fc(parts)}"
    if len(parts) > 1 and parts[1] == "experts":
        local = None
        if len(parts) > 3 and parts[2] == "local_experts":  # SequentialMLP
            local = int(parts[3])
        elif len(parts) > 3 and parts[3].rstrip("0123456789") in ("weight", "bias") \
                and parts[3][-1].isdigit():  # TEGroupedMLP: linear_fc1.weight7
            local = int(parts[3][len(parts[3].rstrip("0123456789")):])
        if local is None:  # legacy GroupedMLP: weight1 / weight2 hold every local expert
            return {"weight1": "mlp/experts/fc1", "weight2": "mlp/experts/fc2"}.get(
                parts[-1], "mlp/experts/other")
        gid = expert_ids[local] if expert_ids is not None else local
        return f"mlp/{expert_key(gid, max(num_experts, gid + 1))}/{_fc(parts)}"
    fc = _fc(parts)
    return f"mlp/{fc}" if fc != "other" else "other"


def layer_key(layer_index: int, num_layers: int) -> str:
    """``layer_07``: the global 0-based index, zero-padded to the width of the largest."""
    width = max(2, len(str(max(num_layers - 1, 0))))
    return f"layer_{layer_index:0{width}d}"


def named_parameter_keys(module, num_layers: int) -> list[tuple[str, str, torch.nn.Parameter]]:
    """``(key, name, param)`` for every trainable parameter of one GPTModel chunk.

    The layer of a parameter comes from its TransformerLayer's ``layer_number`` (global,
    1-based), never from the per-stage index in the parameter's name.
    """
    keyed: dict[int, str] = {}
    decoder = getattr(module, "decoder", None)
    for layer in getattr(decoder, "layers", None) or []:
        prefix = layer_key(int(layer.layer_number) - 1, num_layers)
        mlp = getattr(layer, "mlp", None)
        expert_ids = getattr(mlp, "local_expert_indices", None)  # MoE: global expert ids
        num_experts = getattr(getattr(mlp, "config", None), "num_moe_experts", None) or 0
        for name, p in layer.named_parameters():
            keyed.setdefault(id(p), f"{prefix}/{layer_part(name, expert_ids, num_experts)}")
    for attr, key in (("embedding", "embedding"), ("output_layer", "output_layer")):
        sub = getattr(module, attr, None)
        if sub is not None:
            for p in sub.parameters():
                keyed.setdefault(id(p), key)
    for attr in ("final_layernorm", "final_norm"):
        sub = getattr(decoder, attr, None)
        if sub is not None:
            for p in sub.parameters():
                keyed.setdefault(id(p), "final_norm")
    return [(keyed.get(id(p), "other"), name, p)
            for name, p in module.named_parameters() if p.requires_grad]


def model_entries(trainer) -> list[tuple[str, str, torch.nn.Parameter]]:
    """:func:`named_parameter_keys` of every model chunk of this rank."""
    num_layers = trainer.model[0].config.num_layers
    return [e for gpt in trainer.gpt_models for e in named_parameter_keys(gpt, num_layers)]


class PartMonitor(Callback):
    """Base of the monitors that reduce per-part values of the whole model over the world
    (norms, optimizer-state norms, histograms): the interval, the keys every rank agreed
    on (in one fixed order: the reduced vectors' layout) and this rank's
    ``(key, name, param)`` entries of those keys. A subclass narrows the keys with
    :meth:`select`."""

    def __init__(self, interval: int, log_last_step: bool = True):
        if interval < 0:
            raise ValueError(f"{type(self).__name__}: interval must be >= 0, got {interval}")
        self.interval, self.log_last_step = interval, log_last_step
        self.keys: list[str] = []
        """The monitored keys, the same on every rank."""
        self.last: dict = {}
        self._entries = None  # [(key, name, param)] of this rank, from the model

    def select(self, keys: list[str]) -> list[str]:
        """The keys to monitor, of all the model's (agreed) keys; default: all."""
        return keys

    def on_train_start(self, trainer) -> None:
        if not self.interval:
            return
        entries = model_entries(trainer)
        # Every rank knows every key (a pipeline stage holds only some), so every rank
        # selects alike and reduces the same fixed-order vectors. Collective.
        self.keys = self.select(agree_keys(entries))
        chosen = set(self.keys)
        self._entries = [e for e in entries if e[0] in chosen]
        self._index = {key: i for i, key in enumerate(self.keys)}

    def due(self, trainer) -> bool:
        """Whether this step is one the monitor logs (and it is on)."""
        return self._entries is not None and trainer.metrics.due(self.interval,
                                                                 self.log_last_step)


class NormMonitor(PartMonitor):
    """Logs ``grad_norm/``, ``param_norm/``, ``update_norm/``, ``update_ratio/`` scalars.

    ``interval``: every N optimizer steps (0 disables); the last step of the run is
    always included. The scalars are recorded into ``trainer.metrics`` after the
    optimizer step, on the logging rank; all ranks must have the monitor (its reduction
    is collective). After a logged step, ``last`` holds ``{tag: value}`` on the logging
    rank. Skipped steps are not logged (there is no update to measure).
    """

    # Before the spike monitor: it reads the per-layer grad norms of the step from the
    # metrics. (They are recorded in on_after_optimizer_step, before any on_step_end, so
    # this order is the documented dependency rather than a requirement of the hooks.)
    priority = 600
    state_key = "norms"

    def __init__(self, interval: int, log_last_step: bool = True):
        super().__init__(interval, log_last_step)
        self._active_step = None

    # -- hooks ------------------------------------------------------------------------
    def on_before_optimizer_step(self, trainer) -> None:
        self._active_step = None
        if not self.due(trainer):
            return
        self._active_step = trainer.metrics.step
        with torch.no_grad():
            owned = owned_slices(trainer, self._entries)
            self._idx = key_indices(owned, self._index, trainer.layout.device)
            self._weights = [o.weight for o in owned]
            self._snapshot = [w.detach().clone() for w in self._weights]
            grad_sq = self._sums([o.grad for o in owned], trainer.layout.device)
            scale = loss_scale(trainer)
            if scale != 1.0:  # fp16: the grads still carry the loss scale
                grad_sq = grad_sq / (scale * scale)
            self._grad_sq = grad_sq
            self._param_sq = self._sums(self._snapshot, trainer.layout.device)

    def on_after_optimizer_step(self, trainer, grad_norm) -> None:
        if self._active_step is None:
            return
        with torch.no_grad():
            for before, after in zip(self._snapshot, self._weights):
                before.sub_(after)  # in place on our own copy only: before - after
            update_sq = self._sums(self._snapshot, trainer.layout.device)
            vector = torch.cat([self._grad_sq, self._param_sq, update_sq])
            self._snapshot = self._weights = None
            dist.all_reduce(vector, op=dist.ReduceOp.SUM)  # the whole world: TP x PP x DP
        if trainer.layout.is_logging_rank and trainer.metrics.step == self._active_step:
            self.last = self._tags(vector.cpu().tolist())
            trainer.metrics.record_many(self.last)

    def _sums(self, tensors, device) -> torch.Tensor:
        """Per-key sums of squares (float64) of ``tensors`` (one per owned slice)."""
        return key_sums(tensors, self._idx, len(self.keys), device)

    # -- output -----------------------------------------------------------------------
    def _tags(self, vector: list[float]) -> dict[str, float]:
        k = len(self.keys)
        sq = {fam: dict(zip(self.keys, vector[i * k:(i + 1) * k]))
              for i, fam in enumerate(("grad_norm", "param_norm", "update_norm"))}
        # Whole layers and the global value are sums of their parts' squares.
        sq = {fam: with_totals(values) for fam, values in sq.items()}
        tags = {}
        for key in sq["grad_norm"]:
            grad, param, update = (math.sqrt(max(sq[f][key], 0.0))
                                   for f in ("grad_norm", "param_norm", "update_norm"))
            tags[f"grad_norm/{key}"] = grad
            tags[f"param_norm/{key}"] = param
            tags[f"update_norm/{key}"] = update
            if param > 0:
                tags[f"update_ratio/{key}"] = update / param
        return tags
