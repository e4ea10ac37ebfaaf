"""Running totals of monitors survive a resume: tokens per dataset after stop + resume
equal those of an uninterrupted run (read back from the event files)."""

import pytest

from phoenix.testing.distributed import run_distributed
from phoenix.testing.tiny import tiny_config_dict
from phoenix.testing.workers import train_and_record

pytestmark = pytest.mark.slow


def _tokens(run_dir, step):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tensorboard"))
    acc.Reload()
    return {tag: [e.value for e in acc.Scalars(tag) if e.step == step][-1]
            for tag in acc.Tags()["scalars"] if tag.startswith("tokens/by_dataset/")}


def test_dataset_tokens_resume(tiny_data, tmp_path):
    logging = {"tensorboard": True, "log_interval": 1}
    full = tiny_config_dict(tiny_data, tmp_path / "full", train={"steps": 4}, logging=logging)
    run_distributed(train_and_record, 1, full)
    split = tiny_config_dict(tiny_data, tmp_path / "split", train={"steps": 4}, logging=logging,
                             checkpoint={"save_at_end": True})
    run_distributed(train_and_record, 1, split, ["train.stop_at_step=2"])
    run_distributed(train_and_record, 1, split)
    expected = _tokens(tmp_path / "full", 4)
    assert set(expected) == {"tokens/by_dataset/web", "tokens/by_dataset/code"}
    assert sum(expected.values()) == 4 * 8 * 64  # every token of the 4 batches, all datasets
    assert _tokens(tmp_path / "split", 4) == expected


def test_steps_rerun_after_a_resume_appear_once(tiny_data, tmp_path):
    """A job that ran past its last checkpoint (steps 4-5 after the save at 3) and was then
    resumed: TensorBoard's reader sees every step of every tag exactly once, in order."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tiny_config_dict(tiny_data, tmp_path / "run", train={"steps": 6},
                           logging={"tensorboard": True, "log_interval": 1},
                           checkpoint={"save_interval": 3, "save_at_end": False})
    run_distributed(train_and_record, 1, run, ["train.stop_at_step=5"])
    (resumed,) = run_distributed(train_and_record, 1, run)
    assert [s["step"] for s in resumed["steps"]] == [4, 5, 6]
    acc = EventAccumulator(str(tmp_path / "run" / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    for tag in ("train/loss", "train/lr"):
        assert [e.step for e in acc.Scalars(tag)] == [1, 2, 3, 4, 5, 6], tag
    losses = {e.step: e.value for e in acc.Scalars("train/loss")}
    for s in resumed["steps"]:
        assert abs(losses[s["step"]] - s["loss"]) < 1e-6
