"""Running totals of monitors survive a resume: tokens per dataset after stop + resume
equal those of an uninterrupted run (read back from the event files), and the spike
detector flags the same steps with the same statistics (its windows are checkpointed)."""

import pytest

from phoenix.monitor.spikes import read_spikes
from phoenix.monitor.tensorboard import tensorboard_dir
from phoenix.testing.distributed import run_distributed
from phoenix.testing.tiny import tiny_config_dict
from phoenix.testing.workers import train_and_record, train_jobs

pytestmark = pytest.mark.slow


def _tokens(run_dir, step):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tensorboard_dir(run_dir, "tiny")))
    acc.Reload()
    return {tag: [e.value for e in acc.Scalars(tag) if e.step == step][-1]
            for tag in acc.Tags()["scalars"] if tag.startswith("2_datasets/tokens/")}


def _spikes(run_dir) -> list:
    return [(r["step"], r["spikes"]) for r in read_spikes(run_dir / "spikes.jsonl")]


def test_dataset_tokens_and_spike_windows_resume(tiny_data, tmp_path):
    """Also the spike detector's windows: a loss spike (x30, injected) at step 3, the first
    step after the resume, is flagged with the statistics of the uninterrupted run (an
    empty window after the resume would flag nothing before ``min_steps`` values)."""
    logging = {"tensorboard": True, "log_interval": 1,
               "spikes": {"enabled": True, "window": 10, "min_steps": 2, "loss_sigma": 5.0,
                          "grad_norm_sigma": None},
               "callbacks": {"inject": {"class": "phoenix.testing.faults:ScaleLossAt",
                                        "step": 3, "factor": 30}}}
    full = tiny_config_dict(tiny_data, tmp_path / "full", train={"steps": 4}, logging=logging)
    run_distributed(train_and_record, 1, full)
    split = tiny_config_dict(tiny_data, tmp_path / "split", train={"steps": 4}, logging=logging,
                             checkpoint={"save_at_end": True})
    run_distributed(train_and_record, 1, split, ["train.stop_at_step=2"])
    run_distributed(train_and_record, 1, split)
    expected = _tokens(tmp_path / "full", 4)
    assert set(expected) == {"2_datasets/tokens/web", "2_datasets/tokens/code"}
    assert sum(expected.values()) == 4 * 8 * 64  # every token of the 4 batches, all datasets
    assert _tokens(tmp_path / "split", 4) == expected
    flagged = _spikes(tmp_path / "full")
    assert [step for step, _ in flagged][:1] == [3] and flagged[0][1]["loss"]["window"] == 2
    assert _spikes(tmp_path / "split") == flagged


def test_steps_rerun_after_any_restart_appear_once(tiny_data, tmp_path):
    """Three jobs on one run directory: one stopped before its first checkpoint (step 2),
    restarted from scratch (nothing to resume) and stopped past its checkpoint (steps 4-5
    after the save at 3), then resumed. TensorBoard's own reader sees every step of every
    tag exactly once, in order, the config text included (it is logged at a job's first
    step, so a later job's copy replaces it)."""
    # The reader of TensorBoard's server (the older event_accumulator does not purge text)
    from tensorboard.backend.event_processing.plugin_event_accumulator import EventAccumulator
    from tensorboard.util.tensor_util import make_ndarray

    run = tiny_config_dict(tiny_data, tmp_path / "run", train={"steps": 6},
                           logging={"tensorboard": True, "log_interval": 1},
                           checkpoint={"save_interval": 3, "save_at_end": False})
    # The three jobs run one after the other in one process (to save start-up time).
    ((stopped, restarted, resumed),) = run_distributed(
        train_jobs, 1, run, [["train.stop_at_step=2"], ["train.stop_at_step=5"], []])
    assert [s["step"] for s in stopped["steps"]] == [1, 2]
    assert [s["step"] for s in restarted["steps"]] == [1, 2, 3, 4, 5]  # nothing to resume
    assert [s["step"] for s in resumed["steps"]] == [4, 5, 6]
    acc = EventAccumulator(str(tensorboard_dir(tmp_path / "run", "tiny")),
                           size_guidance={"tensors": 0})
    acc.Reload()
    tags = acc.Tags()["tensors"]
    assert {"1_train/loss", "1_train/lr", "config/text_summary"} <= set(tags), tags
    for tag in tags:
        steps = [e.step for e in acc.Tensors(tag)]
        assert steps == sorted(set(steps)), (tag, steps)
    for tag in ("1_train/loss", "1_train/lr"):
        assert [e.step for e in acc.Tensors(tag)] == [1, 2, 3, 4, 5, 6], tag
    assert [e.step for e in acc.Tensors("config/text_summary")] == [1, 4]  # jobs 2 and 3
    losses = {e.step: float(make_ndarray(e.tensor_proto)) for e in acc.Tensors("1_train/loss")}
    for s in resumed["steps"]:
        assert abs(losses[s["step"]] - s["loss"]) < 1e-6
