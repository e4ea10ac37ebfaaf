"""MoE routing health in TensorBoard: load-balancing and z losses, tokens per expert,
imbalance, router entropy and dropped tokens, per MoE layer, under any TP/PP/DP/EP layout.

Every ``interval`` optimizer steps (and at the run's last step) :class:`MoEMonitor`
records, on the logging rank, for each MoE layer (global 0-based layer numbers,
zero-padded like the norm tags, ``layer_07``)::

    moe/layer_07/aux_loss          the load-balancing loss of model.moe.aux_loss_type,
                                   WITHOUT its coefficient (see below)
    moe/layer_07/z_loss            the router z-loss, without its coefficient
                                   (only with model.moe.z_loss_coeff)
    moe/layer_07/expert_03/tokens  expert 3's share of the layer's routed (token, expert)
                                   assignments; the shares sum to 1, 1/E is perfect balance
                                   (only for E <= ``expert_scalars_max``)
    moe/layer_07/tokens_per_expert a histogram of those shares (every E)
    moe/layer_07/imbalance         max / mean tokens per expert (1 = balanced; at most E/k,
                                   when every token picks the same k experts)
    moe/layer_07/min_load          min / mean tokens per expert (0 = an expert got nothing)
    moe/layer_07/router_entropy    mean over tokens of the entropy of the router's
                                   distribution over all E experts, in nats (ln E = uniform)
    moe/layer_07/dropped_tokens    fraction of the k assignments per token dropped by the
                                   expert capacity (only with model.moe.capacity_factor)
    moe/aux_loss  moe/z_loss       their means over the MoE layers
    moe/imbalance                  the largest imbalance of any MoE layer

Losses. megatron-core's routers save ``aux_loss / coeff`` (and ``z_loss / coeff``) into
``get_moe_layer_wise_logging_tracker()``: the values here are the *unscaled* losses, so a
curve does not move when the coefficient changes (``aux_loss`` is 1.0 for a perfectly
balanced softmax router, about ``E/k`` when every token goes to the same k experts). The
loss that reaches the gradients is ``coeff x`` this value; it never appears in ``1_train/loss``
(``MoEAuxLossAutoScaler`` attaches it to the router's activations through autograd).
Each micro-batch adds its loss to the tracker: the value is the mean over the step's
micro-batches; it is then reduced as megatron's ``reduce_aux_losses_tracker_across_ranks``
does (summed over the loss's own reduce group, e.g. the TP x CP ranks that each hold a
partial sum of ``aux_loss``, averaged over data parallel; the z-loss, a per-rank mean,
averaged over TP x CP x DP). The tracker is cleared after every step, logged or not.

Routing. A forward hook on every ``TopKRouter`` of this rank reads the router's output
``(probs, routing_map [tokens, E])`` of each training micro-batch of a logging step and
adds ``routing_map.sum(0)`` (the tokens each expert receives, after capacity dropping),
the token count and the router entropy (recomputed from the router's logits under
``no_grad``: one [tokens, h] x [h, E] product; scores are softmax over all E logits, or
the sigmoid scores normalised to sum 1). A router sees this rank's tokens only (split by
DP, CP and, with sequence parallelism, by TP), and each pipeline stage holds different
layers: one ``all_reduce(SUM)`` over the whole world of a fixed-size float64 vector gives
the global counts. Routing happens before tokens are dispatched to their expert-parallel
ranks, so EP does not enter the counts. With ``pad_expert_input_to_capacity`` the routing
map marks the padded capacity slots, so the counts read as equal and ``dropped_tokens``
is not meaningful.

The monitor is passive: the hook returns nothing and does no work outside logging
steps; only the (read-only) tracker is cleared. Forward passes in eval mode or without
grad (eval, the first pass of activation recomputation) are not counted, as megatron does
not count them in its losses either.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from phoenix.monitor.base import Callback
from phoenix.monitor.norms import expert_key, layer_key

# Tracker names of the load-balancing losses (one per moe.aux_loss_type) and the z-loss.
LOAD_BALANCING = ("load_balancing_loss", "seq_load_balancing_loss", "global_load_balancing_loss")
Z_LOSS = "z_loss"
# Per-layer columns after the E token counts.
_TOKENS, _ENTROPY, _FORWARDS, _AUX, _Z = range(5)
_EXTRA = 5


def routers(module) -> list:
    """The ``TopKRouter`` modules of one model chunk (one per MoE layer on this stage)."""
    from megatron.core.transformer.moe.router import TopKRouter

    return [m for m in module.modules() if isinstance(m, TopKRouter)]


def router_entropy_sum(logits: torch.Tensor, score_function: str) -> torch.Tensor:
    """Sum over tokens of the entropy (nats) of each token's distribution over the
    experts; ``logits`` [tokens, E]. Softmax scores, or sigmoid scores normalised to 1."""
    logits = logits.double()
    if score_function == "sigmoid":
        scores = torch.sigmoid(logits)
        p = scores / scores.sum(-1, keepdim=True)
        logp = torch.log(p.clamp_min(1e-300))
    else:
        logp = torch.log_softmax(logits, dim=-1)
        p = logp.exp()
    return -(p * logp).sum()


def routing_tags(counts: list[float], tokens: float, topk: int, entropy_sum: float,
                 prefix: str, per_expert: bool, dropped: bool) -> dict[str, float]:
    """The routing scalars of one layer from its global per-expert counts."""
    num_experts = len(counts)
    total = sum(counts)
    tags = {}
    if total > 0:
        mean = total / num_experts
        tags[f"{prefix}/imbalance"] = max(counts) / mean
        tags[f"{prefix}/min_load"] = min(counts) / mean
        if per_expert:
            for e, c in enumerate(counts):
                tags[f"{prefix}/{expert_key(e, num_experts)}/tokens"] = c / total
    if tokens > 0:
        tags[f"{prefix}/router_entropy"] = entropy_sum / tokens
        if dropped:
            tags[f"{prefix}/dropped_tokens"] = max(0.0, 1.0 - total / (tokens * topk))
    return tags


class MoEMonitor(Callback):
    """Logs ``moe/*`` scalars (see the module docstring) every ``interval`` steps (0: off;
    the run's last step too). ``expert_scalars_max``: one ``expert_XX/tokens`` scalar per
    expert only up to this many experts (the histogram is always written). All ranks must
    have the monitor (its reduction is collective); ``last`` holds the latest logged tags
    on the logging rank."""

    priority = 450  # a producer, like the other monitors; reads nothing they record
    expert_scalars_max = 32

    def __init__(self, interval: int, log_last_step: bool = True, *, moe=None,
                 num_layers: int | None = None):
        """``moe``: the run's ``model.moe`` section, ``num_layers`` its ``model.num_layers``
        (None: read from the trainer's config at train start)."""
        if interval < 0:
            raise ValueError(f"MoEMonitor: interval must be >= 0, got {interval}")
        self.interval, self.log_last_step = interval, log_last_step
        self._moe_cfg, self._num_layers = moe, num_layers
        self.last: dict[str, float] = {}
        self._handles: list = []
        self._stats = None

    # -- hooks ------------------------------------------------------------------------
    def on_train_start(self, trainer) -> None:
        moe = self._moe_cfg if self._moe_cfg is not None else trainer.cfg.model.moe
        if moe is None or not self.interval:
            return
        self._trainer, self._moe = trainer, moe
        self.num_layers = self._num_layers or trainer.cfg.model.num_layers
        self.layers = moe.moe_layers(self.num_layers)  # global 0-based, on every rank
        self._row = {layer: i for i, layer in enumerate(self.layers)}
        self._stats = torch.zeros(len(self.layers), moe.num_experts + _EXTRA, dtype=torch.float64,
                                  device=trainer.layout.device)
        for chunk in trainer.model:
            for router in routers(chunk):
                self._handles.append(router.register_forward_hook(self._hook))
        _clear_tracker()  # nothing from before this run (e.g. a model built earlier)

    def _hook(self, router, args, output) -> None:
        if not (router.training and torch.is_grad_enabled()):
            return  # eval, or the no-grad first pass of activation recomputation
        if not self._trainer.metrics.due(self.interval, self.log_last_step):
            return
        index = self._row.get(int(router.layer_number) - 1)
        if index is None:  # not a decoder MoE layer (e.g. a multi-token-prediction layer)
            return
        with torch.no_grad():
            _, routing_map = output
            row = self._stats[index]
            counts = routing_map.sum(dim=0, dtype=torch.float64)
            num_experts = counts.numel()
            row[:num_experts] += counts
            row[num_experts + _TOKENS] += routing_map.shape[0]
            logits = router.gating(args[0]).reshape(-1, num_experts)
            score_function = self._moe.router_score_function
            row[num_experts + _ENTROPY] += router_entropy_sum(logits, score_function)
            row[num_experts + _FORWARDS] += 1

    def on_step_end(self, trainer, metrics) -> None:
        if self._stats is None:
            return
        try:
            if trainer.metrics.due(self.interval, self.log_last_step):
                self._log(trainer)
        finally:  # every step: nothing accumulates into the next one
            self._stats.zero_()
            _clear_tracker()

    def on_train_end(self, trainer) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    # -- reduction and tags -----------------------------------------------------------
    def _log(self, trainer) -> None:
        layout, E = trainer.layout, self._moe.num_experts
        stats = self._stats
        forwards = stats[:, E + _FORWARDS].clamp_min(1)
        # Ranks of one pipeline stage; a loss reduced over a group of g of them is summed
        # there and averaged over the stage_size / g copies (megatron's DP average).
        stage_size = layout.world_size // layout.pp_size
        layer_index = torch.tensor(self.layers, dtype=torch.long)
        for name, entry in _tracker().items():
            column = E + (_AUX if name in LOAD_BALANCING else _Z if name == Z_LOSS else -1)
            if column < E:
                continue
            group = entry.get("reduce_group")
            group_size = dist.get_world_size(group) if group is not None else 1
            values = entry["values"].detach().to(stats.device, torch.float64)[layer_index]
            stats[:, column] += values / forwards / (stage_size / group_size)
        dist.all_reduce(stats, op=dist.ReduceOp.SUM)  # TP x CP x DP tokens, PP layers
        if not layout.is_logging_rank:
            return
        tags, aux, z, imbalance = {}, [], [], []
        per_expert = E <= self.expert_scalars_max
        moe = self._moe
        for layer, row in zip(self.layers, stats.cpu().tolist()):
            prefix = f"moe/{layer_key(layer, self.num_layers)}"
            tags.update(routing_tags(row[:E], row[E + _TOKENS], moe.router_topk,
                                     row[E + _ENTROPY], prefix, per_expert,
                                     dropped=moe.capacity_factor is not None))
            if moe.aux_loss_type != "none" and moe.aux_loss_coeff > 0:
                tags[f"{prefix}/aux_loss"] = row[E + _AUX]
                aux.append(row[E + _AUX])
            if moe.z_loss_coeff:
                tags[f"{prefix}/z_loss"] = row[E + _Z]
                z.append(row[E + _Z])
            if f"{prefix}/imbalance" in tags:
                imbalance.append(tags[f"{prefix}/imbalance"])
            total = sum(row[:E])
            if total > 0:
                trainer.metrics.record_histogram(f"{prefix}/tokens_per_expert",
                                                 stats.new_tensor(row[:E]).cpu() / total)
        for name, values in (("moe/aux_loss", aux), ("moe/z_loss", z)):
            if values:
                tags[name] = math.fsum(values) / len(values)
        if imbalance:
            tags["moe/imbalance"] = max(imbalance)
        self.last = tags
        trainer.metrics.record_many(tags)


def _tracker() -> dict:
    from megatron.core.transformer.moe.moe_utils import get_moe_layer_wise_logging_tracker

    return get_moe_layer_wise_logging_tracker()


def _clear_tracker() -> None:
    from megatron.core.transformer.moe.moe_utils import clear_aux_losses_tracker

    clear_aux_losses_tracker()
