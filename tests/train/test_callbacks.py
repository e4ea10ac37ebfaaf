"""Named callbacks (logging.callbacks): built-ins turned off by name, the user's own added
by class path with keyword arguments, every callback knowing its name."""

import pytest

from phoenix.config import ConfigError
from phoenix.testing.distributed import run_distributed
from phoenix.testing.tiny import tiny_config, tiny_config_dict


def _train_and_list(config: dict) -> dict:
    from phoenix.config import build_config
    from phoenix.runtime import init_runtime
    from phoenix.train.trainer import Trainer

    cfg = build_config(config)
    trainer = Trainer(cfg, init_runtime(cfg))
    trainer.setup()
    trainer.train()
    by_name = {cb.name: cb for cb in trainer.callbacks}
    return {"names": sorted(by_name), "classes": {n: type(cb).__name__ for n, cb in by_name.items()},
            "recorded": [s["step"] for s in by_name["recorder"].steps],
            "interval": by_name["gc_every_2"].interval}


@pytest.mark.slow
def test_a_builtin_off_and_two_of_the_users_on_by_name(tiny_data, tmp_path):
    cfg = tiny_config_dict(tiny_data, tmp_path / "run", train={"steps": 3},
                           checkpoint={"save_at_end": False},
                           logging={"tensorboard": True, "callbacks": {
                               "norms": False, "throughput": False,
                               "recorder": {"class": "phoenix.testing.workers:Recorder"},
                               "gc_every_2": {"class": "phoenix.train.manual_gc:ManualGC",
                                              "interval": 2}}})
    (result,) = run_distributed(_train_and_list, 1, cfg)
    assert result["names"] == ["console", "dataset_loss", "gc_every_2", "recorder", "tensorboard",
                               "train_scalars"]
    assert result["classes"]["gc_every_2"] == "ManualGC" and result["interval"] == 2
    assert result["recorded"] == [1, 2, 3]


@pytest.mark.parametrize("callbacks,message", [
    ({"norm": False}, r"logging.callbacks.norm: false turns off a built-in callback, one of "),
    ({"mine": {"interval": 2}}, r"logging.callbacks.mine: false, or a mapping with class: "),
    ({"eval": {"class": "a.b:C"}}, r"logging.callbacks.eval: the name of a built-in callback"),
])
def test_bad_callback_entries_are_refused_by_key(tiny_data, tmp_path, callbacks, message):
    with pytest.raises(ConfigError, match=message):
        tiny_config(tiny_data, tmp_path / "run", logging={"callbacks": callbacks})


@pytest.mark.parametrize("target,message", [
    ("phoenix.nothing:X", r"logging.callbacks.x: cannot import phoenix.nothing:X"),
    ("phoenix.config:RunConfig", r"logging.callbacks.x: phoenix.config:RunConfig is not a "),
    ("phoenix.train.manual_gc:ManualGC", r"logging.callbacks.x: phoenix.train.manual_gc:ManualGC: "),
])
def test_a_user_callback_that_cannot_be_built_is_one_config_error(tiny_data, tmp_path, target,
                                                                    message):
    from phoenix.train.callbacks import run_callbacks

    cfg = tiny_config(tiny_data, tmp_path / "run", logging={"callbacks": {"x": {"class": target}}})
    with pytest.raises(ConfigError, match=message):
        run_callbacks(cfg, tmp_path, "")
