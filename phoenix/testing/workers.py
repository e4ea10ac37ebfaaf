"""Functions run inside spawned ranks by the multi-process tests (must be importable)."""

from __future__ import annotations

from phoenix.config import build_config
from phoenix.train.callbacks import Callback


class Recorder(Callback):
    """Keeps every step's metrics in memory (tests compare them across layouts)."""

    def __init__(self):
        self.steps = []

    def on_step_end(self, trainer, metrics) -> None:
        self.steps.append({"step": metrics.step, "loss": metrics.loss,
                           "grad_norm": metrics.grad_norm, "lr": metrics.lr,
                           "consumed_samples": metrics.consumed_samples,
                           "skipped": metrics.skipped})


def train_and_record(config: dict, overrides: list[str] = (), inject_nan_at: int | None = None) -> dict:
    """Train with ``config`` in this rank; return the recorded steps and final state.

    ``inject_nan_at``: make the loss of that step (1-based) NaN, to test the guard.
    """
    from phoenix.runtime import init_runtime
    from phoenix.train import trainer as trainer_mod
    from phoenix.train.trainer import Trainer

    cfg = build_config(config, overrides)
    layout = init_runtime(cfg)
    recorder = Recorder()
    trainer = Trainer(cfg, layout)
    trainer.callbacks.append(recorder)
    trainer.setup()
    if inject_nan_at is not None:
        real_step = trainer_mod.forward_step

        def poisoned(data_iterator, model):
            output, loss_fn = real_step(data_iterator, model)
            if trainer.state.step + 1 == inject_nan_at:
                output = output * float("nan")
            return output, loss_fn

        trainer_mod.forward_step = poisoned
    state = trainer.train()
    return {"steps": recorder.steps, "step": state.step,
            "consumed_samples": state.consumed_samples, "skipped": state.skipped_steps,
            "rank": layout.rank, "layout": layout.describe()}


def train_with_norms(config: dict, overrides: list[str] = (), norm_interval: int = 1) -> dict:
    """Like :func:`train_and_record`, with exactly one ``NormMonitor(norm_interval)`` in the
    callbacks (none when ``norm_interval`` is 0), whatever the trainer's defaults are."""
    from phoenix.monitor.norms import NormMonitor
    from phoenix.runtime import init_runtime
    from phoenix.train.trainer import Trainer

    cfg = build_config(config, overrides)
    layout = init_runtime(cfg)
    recorder = Recorder()
    trainer = Trainer(cfg, layout)
    trainer.callbacks = [cb for cb in trainer.callbacks if not isinstance(cb, NormMonitor)]
    if norm_interval:
        trainer.callbacks.append(NormMonitor(norm_interval))
    trainer.callbacks.append(recorder)
    trainer.setup()
    state = trainer.train()
    return {"steps": recorder.steps, "step": state.step, "rank": layout.rank,
            "layout": layout.describe(), "is_logging_rank": layout.is_logging_rank}
