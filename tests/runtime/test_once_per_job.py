"""Lines every rank computes alike are said once per job, by rank 0 (issue 23): the stage
warnings (also in words a user can act on) and the cpu device backend banner."""

from __future__ import annotations

import logging

import pytest

from phoenix.runtime.command import setup_logging


@pytest.fixture
def restore_logging():
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.mark.parametrize("rank,local_rank", [(0, 0), (1, 1), (2, 0)])
def test_job_wide_lines_come_from_rank_0_only(monkeypatch, capsys, restore_logging,
                                              rank, local_rank):
    monkeypatch.setenv("RANK", str(rank))
    monkeypatch.setenv("LOCAL_RANK", str(local_rank))
    monkeypatch.setenv("WORLD_SIZE", "4")
    setup_logging()
    logging.getLogger("phoenix.data.stage_plans").warning("stage warning")
    logging.getLogger("phoenix.config.stage_table").warning("rope warning")
    logging.getLogger("phoenix.runtime.cpu_backend").info("phoenix: cpu device backend")
    logging.getLogger("phoenix.train.trainer").warning("this rank's own warning")
    out = capsys.readouterr().out
    job_wide = ("stage warning", "rope warning", "cpu device backend")
    if rank == 0:
        assert all(line in out for line in job_wide), out
    else:
        assert not any(line in out for line in job_wide), out
    assert f"[rank {rank}] this rank's own warning" in out


def test_stage_stream_warning_is_in_words(caplog):
    """A change of cut in mid-epoch without an exact continuation (here: the plans of a
    run begun before exact re-cuts) is said in words a user can act on."""
    from phoenix.data.stage_plans import StreamTracker

    tracker = StreamTracker(["web", "code"], seed=1, index_of=None, recut=False)
    tracker.finish(1, (128, False), 400, 100)
    with caplog.at_level(logging.WARNING, logger="phoenix.data.stage_plans"):
        tracker.start(1, (128, True), list(range(380)), packed=False, stage="anneal")
    (message,) = [r.getMessage() for r in caplog.records]
    assert message == (
        "stage 'anneal': dataset 'code' is cut into samples of 128 tokens within its groups "
        "(group_mode: batch), the stage before it into samples of 128 tokens, in mid-epoch, "
        "and a grouped stream stopped inside a group, a change of grouping, or pack_groups "
        "with a new seq_length has no exact continuation: it is read from a new sample order "
        "that starts 25.0% into its epoch, so until the epoch ends some of its tokens may be "
        "read twice and others not at all. To read on without repeats, keep its cut until "
        "the epoch ends")
