"""Side concerns of training (logging, monitoring) hook into the loop as callbacks."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class StepMetrics:
    """What one optimizer step produced; times in seconds, LR per step."""

    step: int
    """Steps completed after this one (1 for the first step)."""
    loss: float
    lr: float
    grad_norm: float
    tokens: int
    """Loss-bearing tokens in this global batch."""
    consumed_samples: int
    consumed_tokens: int
    step_time: float
    data_time: float
    skipped: bool = False
    loss_scale: float | None = None
    extra: dict = field(default_factory=dict)

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.step_time if self.step_time > 0 else 0.0


class Callback:
    """Base class: override the hooks you need. ``trainer`` is the running Trainer."""

    def on_train_start(self, trainer) -> None:
        pass

    def on_before_optimizer_step(self, trainer) -> None:
        """Gradients are final (reduced over DP, scaled by 1/tokens) but not yet clipped
        or applied; ``trainer.state.step`` is the number of steps completed before this one,
        ``trainer.loss`` this step's global loss. ``trainer.request_skip(reason)`` vetoes
        the update (e.g. on a loss spike)."""

    def on_after_optimizer_step(self, trainer, grad_norm: float) -> None:
        """Parameters hold the updated values; ``grad_norm`` is megatron's global norm."""

    def on_step_end(self, trainer, metrics: StepMetrics) -> None:
        pass

    def on_checkpoint_saved(self, trainer, path) -> None:
        pass

    def on_train_end(self, trainer) -> None:
        pass
