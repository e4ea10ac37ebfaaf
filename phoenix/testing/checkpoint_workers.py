"""Rank functions of the checkpoint-saving tests (asynchronous save, optimizer formats):
jobs killed between the write and the publication of a save, writes that fail in the
background writer, a non-finite state its writer refuses."""

from __future__ import annotations

import logging
import os
import signal

from phoenix.testing.workers import train_and_record


def train_killed_before_publishing(config: dict, step: int) -> None:
    """Train with ``config`` (asynchronous saves) and SIGKILL this rank once the background
    writer of checkpoint ``step`` has finished but before the save is published: the
    shards are all on disk, ``latest`` and the rename are not."""
    from phoenix.checkpoint.store import CheckpointStore

    original = CheckpointStore.finish_pending

    def finish_pending(self, block):
        if self.pending is not None and self.pending.step == step:
            for call in self._queue.async_calls:  # the writer process is done...
                if call.async_caller.process is not None:
                    call.async_caller.process.join()
            os.kill(os.getpid(), signal.SIGKILL)  # ...and the job dies before publishing
        return original(self, block)

    CheckpointStore.finish_pending = finish_pending
    train_and_record(config)


def train_with_failing_write(config: dict, step: int, rank: int) -> dict:
    """Train with ``config`` while the background shard writer of checkpoint ``step`` fails
    on ``rank`` (an I/O error in the forked writer); returns the run's record and the
    error lines logged."""
    import errno

    import torch.distributed as dist
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    writer = filesystem_async.FileSystemWriterAsync
    original = writer.write_preloaded_data_multiproc
    fail = dist.get_rank() == rank

    def failing(transform_list, use_msc, rank_, write_buckets, results_queue):
        if fail and any(f"step_{step:06d}" in str(b[0]) for b in write_buckets):
            results_queue.put(OSError(errno.EIO, os.strerror(errno.EIO)))
            return
        return original(transform_list, use_msc, rank_, write_buckets, results_queue)

    writer.write_preloaded_data_multiproc = staticmethod(failing)
    return _recording_errors(config)


def train_with_nonfinite_save(config: dict, step: int, rank: int) -> dict:
    """Train with ``config`` (asynchronous saves) with a NaN in the first Adam moment of
    ``rank``'s optimizer while checkpoint ``step`` is handed to its writer: set just before
    the save call and restored right after it, so training itself stays finite and only the
    forked writer sees it; returns the run's record and the error lines logged."""
    import math

    import torch.distributed as dist

    from phoenix.checkpoint.store import CheckpointStore

    original = CheckpointStore.save

    def save(self, step_, model_chunks, optimizer, *args, **kwargs):
        if step_ != step or dist.get_rank() != rank:
            return original(self, step_, model_chunks, optimizer, *args, **kwargs)
        inner = getattr(optimizer, "chained_optimizers", [optimizer])[0].optimizer
        moment = inner.state[inner.param_groups[0]["params"][0]]["exp_avg"].view(-1)
        kept = moment[0].item()
        moment[0] = math.nan
        try:
            return original(self, step_, model_chunks, optimizer, *args, **kwargs)
        finally:
            moment[0] = kept

    CheckpointStore.save = save
    return _recording_errors(config)


def _recording_errors(config: dict) -> dict:
    errors = []

    class Keep(logging.Handler):
        def emit(self, record):
            if record.levelno >= logging.ERROR:
                errors.append(record.getMessage())

    logging.getLogger("phoenix").addHandler(Keep())
    result = train_and_record(config)
    return {**result, "errors": errors}


def train_jobs_recording_plan_reuse(config: dict, jobs: list[list[str]]) -> list[dict]:
    """:func:`phoenix.testing.workers.train_jobs`, each job's record with ``plan_reused``:
    for each save of the job, whether it reused megatron's save plans
    (phoenix.checkpoint.sharded_save.SavePlans)."""
    from phoenix.checkpoint.sharded_save import SavePlans

    original, reused = SavePlans.prepare, []

    def prepare(self, sharded):
        out = original(self, sharded)
        reused.append(self.reused)
        return out

    SavePlans.prepare = prepare
    results = []
    for overrides in jobs:
        reused.clear()
        results.append({**train_and_record(config, overrides), "plan_reused": list(reused)})
    return results
