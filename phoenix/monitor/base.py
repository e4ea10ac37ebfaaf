"""The callback base and the one metrics path of a training step.

Side concerns of training (logging, norms, spikes, throughput, eval) hook into the loop
as :class:`Callback` objects. The trainer runs them sorted by :attr:`Callback.priority`
(higher first; equal priorities keep the order in which they were added) and, for one
optimizer step, calls::

    on_before_optimizer_step -> [optimizer step] -> on_after_optimizer_step
        -> on_step_end(StepMetrics) -> log_metrics(MetricsCollector)

Metrics path: at the start of every step the trainer makes a fresh
:class:`MetricsCollector` (``trainer.metrics``). Producers record scalars (and texts) into
it with :meth:`MetricsCollector.record` in any hook of that step; once every
``on_step_end`` has run, the trainer hands the collector to every callback's
:meth:`Callback.log_metrics`, which sinks (e.g. the TensorBoard logger, the only owner
of a ``SummaryWriter``) override to write what was recorded. A producer may also read
what others recorded earlier in the same step (e.g. the spike monitor reads the
per-layer grad norms the norm monitor recorded after the optimizer step). Values are
recorded as final, global numbers: each producer does its own reduction over the group
it needs, the collector never communicates. By convention only the logging rank
(``layout.is_logging_rank``: the rank that holds the loss and owns the sinks) records.

When a metric is written is decided in one place, :func:`is_logging_step` (every
``interval`` steps and at the run's last step); ``MetricsCollector.due(interval)`` asks it
for the collector's step.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Iterable


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
    """Seconds from the step's data to its LR update (its callbacks not included)."""
    data_time: float
    forward_backward_time: float = 0.0
    """Seconds of forward-backward, the loss report and the finiteness verdict."""
    optimizer_time: float = 0.0
    """Seconds of the optimizer step (or the agreed skip) and the LR schedule."""
    callbacks_time_prev_step: float = 0.0
    """Seconds the previous step's callbacks and sinks took (the logging cost; the trainer
    charges them to the next step)."""
    skipped: bool = False
    skip_reason: str | None = None
    """Why the update was not applied (non-finite loss/gradients, a callback's request)."""
    loss_scale: float | None = None
    stage: Any = None
    """The step's stage (phoenix.config.stage_table's resolved stage), None outside a run."""
    stage_began: bool = False
    """Whether the stage began with this step (or the run resumed into it here)."""
    extra: dict = field(default_factory=dict)
    """Further values a caller attaches (none from the trainer)."""

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.step_time if self.step_time > 0 else 0.0


def is_logging_step(step: int, interval: int, last_step: int | None = None) -> bool:
    """Whether ``step`` (steps completed, 1-based) is written for ``interval``: every
    ``interval`` steps, and at ``last_step`` (the run's last step; ``None``: no such
    rule). ``interval`` 0 turns the periodic writes off, and the last-step rule with it
    (a monitor with interval 0 is off)."""
    if interval <= 0:
        return False
    return step % interval == 0 or step == last_step


@dataclass(frozen=True)
class Histogram:
    """A histogram already bucketed (e.g. over the whole world by
    phoenix.monitor.histograms), in TensorBoard's ``HistogramProto`` terms.

    ``bucket_limits[i]`` is the right edge of bucket ``i`` (the first bucket starts at
    ``min``, the last ends at ``max``); ``bucket_counts[i]`` the number of values in it.
    ``sum`` and ``sum_squares`` are over all ``num`` values.
    """

    min: float
    max: float
    num: float
    sum: float
    sum_squares: float
    bucket_limits: tuple[float, ...]
    bucket_counts: tuple[float, ...]

    def __post_init__(self):
        if len(self.bucket_limits) != len(self.bucket_counts) or not self.bucket_limits:
            raise ValueError("Histogram: bucket_limits and bucket_counts must have the same, "
                             "non-zero length")

    @property
    def bucket_edges(self) -> list[float]:
        """The ``len + 1`` edges (``numpy.histogram``'s ``bins``): ``[min, *bucket_limits]``."""
        return [self.min, *self.bucket_limits]


class MetricsCollector:
    """The metrics recorded during one optimizer step, in recording order.

    ``step``: the step the values belong to (steps completed after it, the x axis of
    every curve). ``last_step``: the run's last step (always a logging step).
    ``log_interval``: the run's ``logging.log_interval``, the default of :meth:`due`.
    """

    def __init__(self, step: int, last_step: int | None = None, log_interval: int = 1):
        self.step, self.last_step, self.log_interval = step, last_step, log_interval
        self.scalars: dict[str, float] = {}
        self.texts: dict[str, str] = {}
        self.images: dict = {}
        """Tag -> RGB image, ``uint8 [H, W, 3]`` (e.g. the needle eval's heatmap)."""
        self.histograms: dict = {}
        """Tag -> 1-D tensor of values (e.g. the MoE monitor's tokens per expert), or a
        :class:`Histogram` already bucketed (the weight/gradient histograms)."""

    def due(self, interval: int | None = None, include_last: bool = True) -> bool:
        """Whether this step is written for ``interval`` (default: ``log_interval``);
        see :func:`is_logging_step`. ``include_last=False``: not the last-step rule."""
        return is_logging_step(self.step, self.log_interval if interval is None else interval,
                               self.last_step if include_last else None)

    def record(self, name: str, value) -> None:
        """Record scalar ``name`` for this step (a later record of the name replaces it).
        Tensors are turned into floats now, so later in-place updates cannot change it."""
        self.scalars[name] = float(value)

    def record_many(self, values: dict) -> None:
        for name, value in values.items():
            self.record(name, value)

    def record_text(self, name: str, text: str) -> None:
        self.texts[name] = str(text)

    def record_image(self, name: str, image) -> None:
        """Record an RGB image ``uint8 [H, W, 3]`` (a numpy array) for this step."""
        self.images[name] = image

    def record_histogram(self, name: str, values) -> None:
        """Record a histogram for this step: its values (a 1-D tensor, copied now), or a
        :class:`Histogram` of bucket counts (for tensors too large to copy to one rank)."""
        if isinstance(values, Histogram):
            self.histograms[name] = values
        else:
            self.histograms[name] = values.detach().float().cpu().clone()

    def get(self, name: str, default=None):
        return self.scalars.get(name, default)

    def with_prefix(self, prefix: str) -> dict[str, float]:
        """The scalars whose name starts with ``prefix`` (e.g. ``"grad_norm/"``)."""
        return {k: v for k, v in self.scalars.items() if k.startswith(prefix)}

    def __len__(self) -> int:
        return len(self.scalars) + len(self.texts) + len(self.images) + len(self.histograms)

    def __repr__(self) -> str:
        return f"MetricsCollector(step={self.step}, {len(self.scalars)} scalars, {len(self.texts)} texts)"


class Callback:
    """Base class: override the hooks you need. ``trainer`` is the running Trainer.

    ``priority``: the trainer runs callbacks in descending priority (higher first),
    every hook; callbacks of equal priority keep the order in which they were added
    (user callbacks default to 0). ``state_key``: the stable name under which a stateful
    callback (one with ``state_dict()``/``load_state_dict()``, which the trainer hands to
    its checkpointer) keeps its state in a checkpoint; a callback without ``state_dict``
    has nothing saved whatever its key.
    """

    priority: ClassVar[int] = 0
    state_key: ClassVar[str | None] = None
    name: str = ""
    """The name the run knows it by (phoenix.train.callbacks; ``logging.callbacks``)."""

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

    def log_metrics(self, trainer, metrics: MetricsCollector) -> None:
        """Sinks override this: write what was recorded this step (called once per step,
        after every ``on_step_end``, on every rank, also when nothing was recorded)."""

    def on_checkpoint_saved(self, trainer, path) -> None:
        pass

    def on_train_end(self, trainer) -> None:
        pass


def sort_callbacks(callbacks: Iterable[Callback]) -> list[Callback]:
    """``callbacks`` in running order: descending ``priority``, stable among equals."""
    return sorted(callbacks, key=lambda cb: -getattr(cb, "priority", 0))
