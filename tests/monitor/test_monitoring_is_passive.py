"""Logging must not change the numbers being trained: TensorBoard + console at every step
(with per-layer norms, the optimizer-state norms and weight/gradient histograms of every
part) versus no monitoring at all give bit-identical losses and grad norms."""

import pytest

from phoenix.monitor.tensorboard import tensorboard_dir
from phoenix.testing.distributed import run_distributed
from phoenix.testing.norm_runs import tb_scalars
from phoenix.testing.tiny import tiny_config_dict
from phoenix.testing.workers import train_and_record

pytestmark = pytest.mark.slow


def _histogram_tags(folder) -> list[str]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder))
    acc.Reload()
    return [t for t in acc.Tags()["histograms"] if t.startswith(("param_hist/", "grad_hist/"))]


def test_monitoring_does_not_change_training(tiny_data, tmp_path):
    on = tiny_config_dict(tiny_data, tmp_path / "on", train={"steps": 4},
                          logging={"tensorboard": True, "log_interval": 1,
                                   "optimizer_state_norms": 1,
                                   "histograms": {"interval": 1, "patterns": ["*"]}})
    off = tiny_config_dict(tiny_data, tmp_path / "off", train={"steps": 4},
                           logging={"tensorboard": False, "log_interval": 1000})
    (with_logs,) = run_distributed(train_and_record, 1, on)
    (without,) = run_distributed(train_and_record, 1, off)
    assert len(_histogram_tags(tensorboard_dir(tmp_path / "on", "tiny"))) > 20
    assert "adam_direction_norm/global" in tb_scalars(tmp_path / "on")  # the named callback
    assert not (tmp_path / "off" / "tensorboard").exists()
    assert [(s["loss"], s["grad_norm"]) for s in with_logs["steps"]] == \
           [(s["loss"], s["grad_norm"]) for s in without["steps"]]
