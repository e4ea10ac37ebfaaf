"""Faults a recipe can inject through ``logging.callbacks`` (examples and end-to-end tests):
a loss spike at a chosen step, so that the forensics tools have something to find."""

from __future__ import annotations

from phoenix.monitor.base import Callback


class ScaleLossAt(Callback):
    """Multiply the per-token losses of optimizer step ``step`` (1-based, as
    ``1_train/loss`` numbers steps) by ``factor``: the logged loss and the gradients of
    that step grow by ``factor``, as a batch of bad data would make them.

    ``logging.callbacks={inject_spike: {class: "phoenix.testing.faults:ScaleLossAt",
    step: 13, factor: 30}}``. A step that ``train.skip_batches`` skips runs no forward
    pass, so the fault never fires there.
    """

    def __init__(self, step: int, factor: float = 30.0):
        if not (isinstance(step, int) and step >= 1):
            raise ValueError(f"step must be an integer >= 1, got {step!r}")
        self.step, self.factor = step, float(factor)

    def on_train_start(self, trainer) -> None:
        from phoenix.testing.workers import scale_loss_at_step

        scale_loss_at_step(trainer, self.step, self.factor)
