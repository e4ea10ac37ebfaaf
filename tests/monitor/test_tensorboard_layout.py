"""Where the TensorBoard sink writes: ``<output_dir>/tensorboard/<name>/``, so TensorBoard
pointed at the parent of several output dirs names each run by its name, and a second
job of the same run appends to the same folder, hiding the steps it re-runs."""

import time
from types import SimpleNamespace

import pytest

from phoenix.monitor.base import MetricsCollector
from phoenix.monitor.tensorboard import TensorBoardLogger, tensorboard_dir


def _job(log_dir, start_step: int, steps: range, value: float) -> None:
    """One job of a run: the sink alone, writing ``1_train/loss`` at ``steps``."""
    trainer = SimpleNamespace(layout=SimpleNamespace(is_logging_rank=True),
                              state=SimpleNamespace(step=start_step))
    tb = TensorBoardLogger(log_dir, config_yaml="name: x")
    tb.on_train_start(trainer)
    for step in steps:
        metrics = MetricsCollector(step)
        metrics.record("1_train/loss", value)
        tb.log_metrics(trainer, metrics)
    tb.on_train_end(trainer)


def test_runs_are_named_by_the_recipe_name(tmp_path):
    from tensorboard.backend.event_processing.event_multiplexer import EventMultiplexer

    _job(tensorboard_dir(tmp_path / "a", "alpha"), 0, range(1, 4), 1.0)
    _job(tensorboard_dir(tmp_path / "b", "beta"), 0, range(1, 3), 2.0)
    # A second job of alpha resumed from step 2: it re-runs step 3 and goes on. TensorBoard
    # reads a folder's event files in name order, ``events.out.tfevents.<seconds>.<host>.
    # <pid>.<writer count>``: jobs are processes started seconds apart, but here they share
    # a process, and within one second the writer count decides (".10" before ".9").
    time.sleep(1.0 - time.time() % 1.0 + 0.01)
    _job(tensorboard_dir(tmp_path / "a", "alpha"), 2, range(3, 6), 3.0)

    mux = EventMultiplexer().AddRunsFromDirectory(str(tmp_path))
    mux.Reload()
    assert sorted(mux.Runs()) == ["a/tensorboard/alpha", "b/tensorboard/beta"]
    alpha = [(e.step, e.value) for e in mux.Scalars("a/tensorboard/alpha", "1_train/loss")]
    assert alpha == [(1, 1.0), (2, 1.0), (3, 3.0), (4, 3.0), (5, 3.0)]  # step 3 once

    one = EventMultiplexer().AddRunsFromDirectory(str(tmp_path / "a" / "tensorboard"))
    assert list(one.Runs()) == ["alpha"]  # pointed at one output dir: the run's name


@pytest.mark.parametrize("name", ["", "/abs", "../up", "a/../../b"])
def test_run_names_that_leave_tensorboard_are_refused(tmp_path, name):
    with pytest.raises(ValueError, match="run name"):
        tensorboard_dir(tmp_path, name)
