"""checkpoint.async_save: megatron's asynchronous sharded save, finished at a later step.

Two gloo ranks (DP=2) in real processes: the background save writes the same checkpoint a
synchronous one does, also the third save of a job, which reuses megatron's save plans, and
the run resumes from it exactly; ``latest`` moves only when the
save is published (a job killed after the write, before the publication, leaves the
previous checkpoint as latest and its temporary directory is swept by the next job); a
write that fails in the background writer follows ``checkpoint.on_save_error``, and so does a
non-finite state, which the forked writer refuses before it writes anything."""

import re
import shutil

import pytest
import torch

from phoenix.checkpoint import find_latest
from phoenix.testing.checkpoint_workers import (
    train_jobs_recording_plan_reuse,
    train_killed_before_publishing,
    train_with_failing_write,
    train_with_nonfinite_save,
)
from phoenix.testing.checkpoints import read_checkpoint_tensors
from phoenix.testing.distributed import run_distributed
from phoenix.testing.tiny import tiny_config_dict
from phoenix.testing.workers import train_and_record

pytestmark = pytest.mark.slow


def _config(tiny_data, run, **checkpoint):
    return tiny_config_dict(tiny_data, run, train={"steps": 6},
                            checkpoint={"save_interval": 2, "save_at_end": False, **checkpoint})


def test_async_save_writes_what_a_sync_save_writes_and_resumes_exactly(tiny_data, tmp_path):
    sync = _config(tiny_data, tmp_path / "sync")
    sync["train"]["steps"] = 8
    reference = run_distributed(train_and_record, 2, sync)[0]  # uninterrupted, sync saves

    cfg = _config(tiny_data, tmp_path / "async", async_save=True)
    cfg["train"]["steps"] = 8
    # stop after step 7: the save of step 6 runs in the background and is published at the
    # next step or, at the latest, when the job ends; the second job resumes from it
    first, second = run_distributed(train_jobs_recording_plan_reuse, 2, cfg,
                                    [["train.stop_at_step=7"], []])[0]
    assert first["step"] == 7 and [s["step"] for s in second["steps"]] == [7, 8]
    # saves 1 and 2 of a job plan (megatron compares the two plans), save 3 reuses them
    assert first["plan_reused"] == [False, False, True]
    root = tmp_path / "async" / "checkpoints"
    assert find_latest(root).name == "step_000008"
    assert not list(root.glob(".tmp-*"))
    for name in ("step_000002", "step_000004", "step_000006", "step_000008"):
        a = read_checkpoint_tensors(root / name)
        b = read_checkpoint_tensors(tmp_path / "sync" / "checkpoints" / name)
        assert a.keys() == b.keys()
        for key in a:  # the optimizer's bucket padding is never read: not compared
            if "padding" not in key:
                assert torch.equal(a[key], b[key]), (name, key)
    for a, b in zip(reference["steps"][6:], second["steps"]):
        assert a["step"] == b["step"] and a["loss"] == b["loss"] and a["grad_norm"] == b["grad_norm"]


def test_latest_moves_only_when_the_save_is_published(tiny_data, tmp_path):
    run = tmp_path / "run"
    cfg = _config(tiny_data, run, async_save=True)
    with pytest.raises(RuntimeError, match="distributed run failed"):
        run_distributed(train_killed_before_publishing, 2, cfg, 4)
    root = run / "checkpoints"
    assert (root / "latest").read_text().strip() == "step_000002"
    assert find_latest(root).name == "step_000002"
    assert (root / ".tmp-step_000004").is_dir()  # written, never published
    (resumed,) = run_distributed(train_and_record, 2, cfg, ["train.stop_at_step=3"])[:1]
    assert [s["step"] for s in resumed["steps"]] == [3]  # resumed from step 2
    assert not (root / ".tmp-step_000004").exists()  # swept at start-up


def test_a_failed_background_write_follows_on_save_error(tiny_data, tmp_path):
    cfg = _config(tiny_data, tmp_path / "run", async_save=True, on_save_error="continue",
                  save_at_end=True)
    rank0, _ = run_distributed(train_with_failing_write, 2, cfg, 2, 1)
    assert rank0["step"] == 6
    # the background save of step 4, published when the end-of-job save of step 6 waits
    # for it, is announced (log line, on_checkpoint_saved) before step 6
    assert rank0["saved"] == ["step_000004", "step_000006"]
    (line,) = [e for e in rank0["errors"] if "step_000002" in e]
    assert line.startswith("checkpoint step_000002 was not saved: ") and "\n" not in line
    assert "Errno 5" in line or "I/O error" in line, line
    assert line.endswith("the run has no earlier checkpoint; training continues "
                         "(checkpoint.on_save_error: continue) and saves again at step 4")
    root = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_000004", "step_000006"]

    stop = _config(tiny_data, tmp_path / "stop", async_save=True)  # fails when the job ends
    stop["train"]["steps"] = 3
    with pytest.raises(RuntimeError, match=r"checkpoint step_000002 was not saved: .*Errno 5"):
        run_distributed(train_with_failing_write, 2, stop, 2, 0)
    assert find_latest(tmp_path / "stop" / "checkpoints") is None


_FIRST_MOMENT = ("optimizer.distributed.dp_group_idx_0.gbuf_idx_0.dtype_(torch.float32, "
                 "torch.float32).bucket_idx_0.exp_avg")
"""The checkpoint key of the first Adam moments of the tiny model's first bucket (every
rank writes its own shard of it)."""


def test_the_writer_refuses_a_nonfinite_state(tiny_data, tmp_path):
    """A NaN in rank 0's first Adam moment during the save call of step 4 only (restored
    right after it): the training process does not check it, the forked writer sees it."""
    cfg = _config(tiny_data, tmp_path / "run", async_save=True, on_save_error="continue")
    cfg["train"]["steps"] = 5  # no save after step 4's: latest must stay step 2
    rank0, _ = run_distributed(train_with_nonfinite_save, 2, cfg, 4, 0)
    assert rank0["step"] == 5
    root = tmp_path / "run" / "checkpoints"
    (line,) = [e for e in rank0["errors"] if "step_000004" in e]
    assert re.fullmatch(
        re.escape("checkpoint step_000004 was not saved: the weights or optimizer state hold "
                  "non-finite values (on this rank: " + _FIRST_MOMENT + ") in "
                  f"{root} (") + r"[^)]* needed\); " +
        re.escape("its temporary directory was removed and the previous checkpoint step_000002 "
                  "is intact; training continues (checkpoint.on_save_error: continue) and saves "
                  "again at the end of the job"), line), line
    assert (root / "latest").read_text().strip() == "step_000002"
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_000002"]


def test_a_sync_save_refuses_a_nonfinite_state_on_every_rank(tiny_data, tmp_path):
    """The same NaN in rank 1's moment, saved synchronously: every rank refuses before it
    writes anything, rank 1 naming the tensor it would have written."""
    cfg = _config(tiny_data, tmp_path / "run")
    with pytest.raises(RuntimeError, match="distributed run failed") as failed:
        run_distributed(train_with_nonfinite_save, 2, cfg, 4, 1)
    text = str(failed.value)
    assert ("refusing to save checkpoint step 4: the weights or optimizer state hold non-finite "
            f"values (on this rank: {_FIRST_MOMENT}); the last good checkpoint stays ") in text
    assert "refusing to save checkpoint step 4: the weights or optimizer state hold non-finite " \
           "values (on another rank); the last good checkpoint stays " in text
    root = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_000002"]
