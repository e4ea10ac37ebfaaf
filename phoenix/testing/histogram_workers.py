"""Ranks of the weight/gradient histogram tests (tests/monitor/test_histograms.py)."""

from __future__ import annotations

from phoenix.config import build_config
from phoenix.monitor.base import Callback
from phoenix.testing.workers import Recorder


class FullTensors(Callback):
    """Single process only: at every step, before the optimizer step (where the
    histogram monitor reads them), the full weights and gradients of every norm key,
    each key's parameters flattened and concatenated: ``{step: {key: (weight, grad)}}``.
    A plain read of the model, independent of the monitor's ownership rules."""

    def __init__(self):
        self.tensors: dict[int, dict] = {}

    def on_before_optimizer_step(self, trainer) -> None:
        import torch

        from phoenix.monitor.norms import named_parameter_keys

        num_layers = trainer.model[0].config.num_layers
        parts: dict[str, tuple[list, list]] = {}
        for gpt in trainer.gpt_models:
            for key, _, p in named_parameter_keys(gpt, num_layers):
                grad = getattr(p, "main_grad", None)
                grad = p.grad if grad is None else grad
                weights, grads = parts.setdefault(key, ([], []))
                weights.append(p.detach().float().reshape(-1).clone())
                grads.append(grad.detach().float().reshape(-1).clone())
        self.tensors[trainer.metrics.step] = {
            key: (torch.cat(w), torch.cat(g)) for key, (w, g) in parts.items()}


def train_with_histograms(config: dict, overrides: list[str] = (), full: bool = False) -> dict:
    """Train with ``config`` (its ``logging.histograms`` builds the monitor); return the
    recorded steps, the layout and (``full``, single process) :class:`FullTensors`'
    tensors."""
    from phoenix.runtime import init_runtime
    from phoenix.train.trainer import Trainer

    cfg = build_config(config, overrides)
    layout = init_runtime(cfg)
    recorder, full_tensors = Recorder(), FullTensors()
    trainer = Trainer(cfg, layout)
    trainer.callbacks += [recorder, full_tensors] if full else [recorder]
    trainer.setup()
    trainer.train()
    return {"steps": recorder.steps, "layout": layout.describe(),
            "is_logging_rank": layout.is_logging_rank,
            "tensors": full_tensors.tensors if full else None}
