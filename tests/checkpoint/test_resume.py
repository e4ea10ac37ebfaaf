"""Resume is exact; checkpoints reshard across TP/PP; a NaN loss never overwrites a good one."""

import math
import shutil

import pytest
import torch

from phoenix.checkpoint import find_latest
from phoenix.testing.distributed import run_distributed
from phoenix.testing.tiny import tiny_config_dict
from phoenix.testing.workers import train_and_record

pytestmark = pytest.mark.slow


def test_resume_is_exact(tiny_data, tmp_path):
    full = tiny_config_dict(tiny_data, tmp_path / "full", train={"steps": 6})
    (uninterrupted,) = run_distributed(train_and_record, 1, full)

    split = tiny_config_dict(tiny_data, tmp_path / "split", train={"steps": 6},
                             checkpoint={"save_interval": 3, "save_at_end": False})
    (first,) = run_distributed(train_and_record, 1, split, ["train.stop_at_step=3", "checkpoint.save_at_end=true"])
    assert first["step"] == 3
    assert find_latest(tmp_path / "split" / "checkpoints").name == "step_000003"
    (second,) = run_distributed(train_and_record, 1, split)  # a fresh process resumes
    assert [s["step"] for s in second["steps"]] == [4, 5, 6]

    resumed = first["steps"] + second["steps"]
    for a, b in zip(uninterrupted["steps"], resumed):
        assert a["step"] == b["step"]
        assert abs(a["loss"] - b["loss"]) <= 1e-6, (a, b)
        assert abs(a["grad_norm"] - b["grad_norm"]) <= 1e-6 * max(1.0, a["grad_norm"]), (a, b)
        assert a["lr"] == b["lr"]
    assert second["consumed_samples"] == uninterrupted["consumed_samples"] == 6 * 8


# TP=2 -> TP=1 of a fully_reshardable checkpoint is the second half of
# test_optimizer_format.py's reshard test (a dp_reshardable one converted, then resumed).
@pytest.mark.parametrize("saved,loaded", [
    ((2, ["parallel.pipeline=2"]), (1, [])),
])
def test_resharding_resume(saved, loaded, tiny_data, tmp_path):
    """Save at TP=2 (PP=2), resume at TP=1 (PP=1): the continuation matches the
    uninterrupted run at the saving layout (fully_reshardable loads at any layout; the
    default dp_reshardable goes through phoenix reshard: test_optimizer_format.py)."""
    world, overrides = saved
    cfg = tiny_config_dict(tiny_data, tmp_path / "saved", train={"steps": 6},
                           checkpoint={"save_interval": 3, "save_at_end": False,
                                       "optimizer_format": "fully_reshardable"})
    reference = run_distributed(train_and_record, world, cfg, overrides)[0]

    resumed_dir = tmp_path / "resharded" / "checkpoints"
    resumed_dir.mkdir(parents=True)
    shutil.copytree(tmp_path / "saved" / "checkpoints" / "step_000003", resumed_dir / "step_000003")
    cfg2 = tiny_config_dict(tiny_data, tmp_path / "resharded", train={"steps": 6})
    world2, overrides2 = loaded
    (resumed,) = run_distributed(train_and_record, world2, cfg2, overrides2)

    assert [s["step"] for s in resumed["steps"]] == [4, 5, 6]
    for a, b in zip(reference["steps"][3:], resumed["steps"]):
        assert abs(a["loss"] - b["loss"]) <= 1e-4 * abs(a["loss"]), (a, b)
    assert resumed["consumed_samples"] == reference["consumed_samples"]


def test_nonfinite_loss_stops_and_keeps_last_checkpoint(tiny_data, tmp_path):
    cfg = tiny_config_dict(tiny_data, tmp_path / "nan", train={"steps": 6},
                           checkpoint={"save_interval": 2, "save_at_end": True})
    with pytest.raises(RuntimeError, match=r"non-finite loss \(nan\) at step 3"):
        run_distributed(train_and_record, 1, cfg, [], 3)
    latest = find_latest(tmp_path / "nan" / "checkpoints")
    assert latest.name == "step_000002"  # no save at the failing step, none at "end"
    assert sorted(p.name for p in (tmp_path / "nan" / "checkpoints").iterdir()) == [
        "latest", "step_000002"]


def test_nonfinite_loss_skip_policy(tiny_data, tmp_path):
    cfg = tiny_config_dict(tiny_data, tmp_path / "skip", train={"steps": 4,
                                                                  "on_nonfinite_loss": "skip"})
    (result,) = run_distributed(train_and_record, 1, cfg, [], 2)
    assert [s["skipped"] for s in result["steps"]] == [False, True, False, False]
    assert result["skipped"] == 1 and result["step"] == 4


def _nonfinite_in_checkpoints(run_dir) -> dict[str, int]:
    """Non-finite values in every checkpoint's model and optimizer tensors, read back with
    torch.distributed.checkpoint in this (non-distributed) process."""
    from phoenix.testing.checkpoints import read_checkpoint_tensors

    return {path.name: sum(int((~torch.isfinite(v)).sum())
                           for v in read_checkpoint_tensors(path).values() if v.is_floating_point())
            for path in sorted((run_dir / "checkpoints").glob("step_*"))}


@pytest.mark.parametrize("policy", ["stop", "skip"])
def test_nonfinite_gradients_never_reach_weights_or_checkpoints(policy, tiny_data, tmp_path):
    """An absurd LR makes the gradients non-finite while the loss is still finite: that
    step is stopped or skipped like a non-finite loss, and every checkpoint stays finite."""
    run = tmp_path / policy
    cfg = tiny_config_dict(tiny_data, run, train={"steps": 8, "on_nonfinite_loss": policy},
                           optim={"lr": 1e6, "min_lr": 0.0, "warmup_steps": 0,
                                  "decay_style": "constant"},
                           checkpoint={"save_interval": 1})
    if policy == "stop":
        with pytest.raises(RuntimeError, match=r"non-finite gradients at step (\d+); stopping "
                                               r"without applying or saving it \(last good "
                                               r"checkpoint: .*step_0+\d+\)"):
            run_distributed(train_and_record, 1, cfg)
    else:
        (result,) = run_distributed(train_and_record, 1, cfg)
        assert result["step"] == 8 and result["skipped"] >= 1
        assert any(s["skipped"] and math.isfinite(s["loss"]) for s in result["steps"])
    counts = _nonfinite_in_checkpoints(run)
    assert counts and not any(counts.values()), counts
