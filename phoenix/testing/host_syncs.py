"""Host synchronisations of one training step, counted on the CPU (runs inside a rank).

Under the strict device mode the cpu backend labels tensors with the device they would
have on a GPU (phoenix.runtime.device_tracking), so every ``.item()``, ``.tolist()``,
``bool()``, ``float()``, ``.numpy()`` or ``.cpu()`` of a would-be GPU tensor is a host
synchronisation a GPU run would pay. :func:`count_step_syncs` trains with the run's
default callbacks and counts them over one whole step cycle that writes nothing.
"""

from __future__ import annotations

from phoenix.config import build_config
from phoenix.monitor.base import Callback


class SyncWindow(Callback):
    """Counts host syncs from the end of step ``first``'s callbacks to the end of step
    ``first + 1``'s: one whole cycle (sinks, checkpoint and stop checks of ``first``, then
    data, forward-backward, the checks, optimizer and callbacks of ``first + 1``)."""

    priority = -2000  # after every other callback, the TensorBoard sink included

    def __init__(self, first: int):
        self.first = first
        self.count: int | None = None
        self.sites: list[str] = []
        self._window = None
        self._counter = None

    def on_step_end(self, trainer, metrics) -> None:
        from phoenix.runtime.device_tracking import count_host_syncs

        if metrics.step == self.first:
            self._window = count_host_syncs()
            self._counter = self._window.__enter__()
        elif metrics.step == self.first + 1 and self._window is not None:
            self._window.__exit__(None, None, None)
            self.count, self.sites = self._counter.count, list(self._counter.sites)
            self._window = None


def count_step_syncs(config: dict, overrides: list[str] = (), first: int = 2) -> dict:
    """Train ``config`` with the default callbacks plus a :class:`SyncWindow` over steps
    ``first`` -> ``first + 1`` (choose steps that log nothing); returns ``{"count",
    "sites", "callbacks"}`` (the callbacks that ran, by class name)."""
    from phoenix.runtime import init_runtime
    from phoenix.train.trainer import Trainer

    cfg = build_config(config, overrides)
    layout = init_runtime(cfg)
    trainer = Trainer(cfg, layout)
    window = SyncWindow(first)
    trainer.callbacks.append(window)
    trainer.setup()
    trainer.train()
    return {"count": window.count, "sites": window.sites,
            "callbacks": [type(cb).__name__ for cb in trainer.callbacks]}
