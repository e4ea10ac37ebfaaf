"""A single-process reference for the optimizer-state norms, and the test runs' monitors.

:class:`StateNormReference` computes ``adam_m_norm``, ``adam_v_norm`` and
``adam_direction_norm`` per key straight from one process's whole Adam state, in float64,
with the textbook formula ``(m / (1 - β1^t)) / (sqrt(v / (1 - β2^t)) + ε)``: no ownership
rules, no slicing, no reduction (tests/monitor/test_optimizer_state_norms.py compares the
monitor's TensorBoard values with it, and every parallel layout with those).
"""

from __future__ import annotations

import math

import torch

from phoenix.monitor.base import Callback


class StateNormReference(Callback):
    """In a single process, every ``interval`` steps (and the last): ``values[step]`` =
    ``{tag: norm}`` for the three families, every key, whole layers and ``global``."""

    def __init__(self, interval: int):
        self.interval = interval
        self.values: dict[int, dict[str, float]] = {}

    def on_after_optimizer_step(self, trainer, grad_norm) -> None:
        from phoenix.monitor.norms import named_parameter_keys

        if not trainer.metrics.due(self.interval):
            return
        num_layers = trainer.model[0].config.num_layers
        squares: dict[str, list[float]] = {}
        with torch.no_grad():
            for gpt in trainer.gpt_models:
                for key, name, p in named_parameter_keys(gpt, num_layers):
                    state, group = _full_state(trainer.optimizer, p)
                    assert state["exp_avg"].numel() == p.numel(), f"{name}: not the whole state"
                    m, v = state["exp_avg"].double(), state["exp_avg_sq"].double()
                    t = float(state["step"])
                    (b1, b2), eps = group["betas"], group["eps"]
                    direction = (m / (1 - b1 ** t)) / ((v / (1 - b2 ** t)).sqrt() + eps)
                    sums = [float((x * x).sum()) for x in (m, v, direction)]
                    layer = [key.split("/", 1)[0]] if key.startswith("layer_") else []
                    for k in (key, *layer, "global"):  # the part, its whole layer, all
                        squares[k] = [a + b for a, b in zip(squares.get(k, [0.0] * 3), sums)]
        self.values[trainer.metrics.step] = {
            f"{family}/{key}": math.sqrt(s[i]) for key, s in squares.items()
            for i, family in enumerate(("adam_m_norm", "adam_v_norm", "adam_direction_norm"))}


def _full_state(optimizer, p) -> tuple[dict, dict]:
    """(Adam state, param group) of model parameter ``p`` in one process."""
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        index = getattr(opt, "model_param_group_index_map", None)
        if index is not None:  # distributed optimizer (one DP rank: the shard is p whole)
            if p in index:
                group = opt.optimizer.param_groups[index[p][0]]
                return opt.optimizer.state[group["params"][index[p][1]]], group
            continue
        main = getattr(p, "main_param", None)
        main = p if main is None else main
        for group in opt.optimizer.param_groups:
            if any(q is main for q in group["params"]):
                return opt.optimizer.state[main], group
    raise KeyError("parameter not found in the optimizer")


def install_norm_monitors(trainer, norm_interval: int, optimizer_state_norms: int):
    """Replace the trainer's norm monitors by ``NormMonitor(norm_interval)`` and
    ``OptimizerStateNormMonitor(optimizer_state_norms)`` (none for 0); in one process,
    also add (and return) a :class:`StateNormReference` at the same interval."""
    import torch.distributed as dist

    from phoenix.monitor.norms import NormMonitor
    from phoenix.monitor.optimizer_state import OptimizerStateNormMonitor

    trainer.callbacks = [cb for cb in trainer.callbacks
                         if not isinstance(cb, (NormMonitor, OptimizerStateNormMonitor))]
    if norm_interval:
        trainer.callbacks.append(NormMonitor(norm_interval))
    if not optimizer_state_norms:
        return None
    trainer.callbacks.append(OptimizerStateNormMonitor(optimizer_state_norms))
    if dist.get_world_size() > 1:
        return None
    reference = StateNormReference(optimizer_state_norms)
    trainer.callbacks.append(reference)
    return reference
