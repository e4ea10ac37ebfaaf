"""train.manual_gc_interval: the collector is off during training and runs every N steps
on every rank (Megatron-LM's --manual-gc); automatic collection is back afterwards."""

import gc

import pytest

from phoenix.config import ConfigError
from phoenix.testing.distributed import run_distributed
from phoenix.testing.tiny import tiny_config, tiny_config_dict


def _train_and_watch_gc(config: dict) -> dict:
    from phoenix.config import build_config
    from phoenix.monitor.base import Callback
    from phoenix.runtime import init_runtime
    from phoenix.train.manual_gc import ManualGC
    from phoenix.train.trainer import Trainer

    class Watch(Callback):
        priority = -4000  # after ManualGC

        def __init__(self):
            self.enabled = []

        def on_step_end(self, trainer, metrics):
            self.enabled.append(gc.isenabled())

    cfg = build_config(config)
    trainer = Trainer(cfg, init_runtime(cfg))
    watch = Watch()
    trainer.callbacks.append(watch)
    trainer.setup()
    trainer.train()
    (manual,) = [cb for cb in trainer.callbacks if isinstance(cb, ManualGC)]
    return {"enabled_during": watch.enabled, "collections": manual.collections,
            "enabled_after": gc.isenabled()}


@pytest.mark.slow
def test_collector_off_during_training_and_run_every_interval(tiny_data, tmp_path):
    cfg = tiny_config_dict(tiny_data, tmp_path / "run", train={"steps": 5, "manual_gc_interval": 2},
                           checkpoint={"save_at_end": False})
    for result in run_distributed(_train_and_watch_gc, 2, cfg):
        assert result == {"enabled_during": [False] * 5, "collections": 2, "enabled_after": True}


def test_negative_interval_is_refused(tiny_data, tmp_path):
    with pytest.raises(ConfigError, match=r"train.manual_gc_interval: must be >= 0"):
        tiny_config(tiny_data, tmp_path / "run", train={"manual_gc_interval": -1})
