"""Logging must not change the numbers being trained: TensorBoard + console at every step
(with the optimizer-state norms, which are off by default) versus no monitoring at all
give bit-identical losses and grad norms."""

import pytest

from phoenix.testing.distributed import run_distributed
from phoenix.testing.norm_runs import tb_scalars
from phoenix.testing.tiny import tiny_config_dict
from phoenix.testing.workers import train_and_record

pytestmark = pytest.mark.slow


def test_monitoring_does_not_change_training(tiny_data, tmp_path):
    on = tiny_config_dict(tiny_data, tmp_path / "on", train={"steps": 4},
                          logging={"tensorboard": True, "log_interval": 1,
                                   "optimizer_state_norms": 1})
    off = tiny_config_dict(tiny_data, tmp_path / "off", train={"steps": 4},
                           logging={"tensorboard": False, "log_interval": 1000})
    (with_logs,) = run_distributed(train_and_record, 1, on)
    (without,) = run_distributed(train_and_record, 1, off)
    assert "adam_direction_norm/global" in tb_scalars(tmp_path / "on")  # the named callback
    assert not (tmp_path / "off" / "tensorboard").exists()
    assert [(s["loss"], s["grad_norm"]) for s in with_logs["steps"]] == \
           [(s["loss"], s["grad_norm"]) for s in without["steps"]]
