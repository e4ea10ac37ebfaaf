"""``phoenix inspect-batch`` shows what a run trained on at every step, also after resumes
that changed the data (issue 22 §3, case ``inspect-batch-after-data-resume``).

Three jobs on one run directory: seq_length 32 to step 3; resumed at seq_length 64 to
step 6 (an implicit stage boundary that re-cuts every stream); resumed with another
mixture to step 9 without a checkpoint after step 6 (so the last boundary is only in the
run directory's config.yaml). The loader's samples of every step, as the trainer
recorded them, must be the samples inspect-batch names for that step.
"""

from __future__ import annotations

import pytest

from phoenix.cli.inspect_batch import batch_samples
from phoenix.testing.distributed import run_distributed
from phoenix.testing.tiny import tiny_config_dict
from phoenix.testing.workers import train_jobs


@pytest.mark.slow
def test_inspect_batch_replays_the_data_resumes(tiny_data, tmp_path):
    run = tmp_path / "run"
    base = tiny_config_dict(tiny_data, run, train={"steps": 9}, checkpoint={"save_interval": 3})
    base["data"]["seq_length"] = 32
    jobs = [["train.stop_at_step=3"],
            ["data.seq_length=64", "train.stop_at_step=6"],
            ["data.seq_length=64", "data.datasets[0].weight=0.3", "data.datasets[1].weight=0.7",
             "checkpoint.save_interval=100"]]
    (results,) = run_distributed(train_jobs, 1, base, jobs)
    trained = {s["step"]: sorted(zip(s["dataset_ids"], s["sample_ids"]))
               for job in results for s in job["steps"]}
    assert sorted(trained) == list(range(1, 10))
    for step in range(1, 10):
        info = batch_samples(run, step)
        shown = sorted((s["dataset_id"], s["sample_id"]) for s in info["samples"])
        assert shown == trained[step], step
        assert info["data_resumed_at"] == (None if step <= 3 else 3 if step <= 6 else 6), step
