"""megatron-core's sharded save, made safe to fail and to kill.

``dist_checkpointing.save`` (megatron-core 0.16.1, ``torch_dist`` format) writes

* ``common.pt`` (rank 0; the non-sharded part of the state), then plans the save (collectives);
* every rank's shard files (forked writer processes);
* ``.metadata`` (rank 0, after gathering every rank's write results) and ``metadata.json``.

A shard that cannot be written is reported on every rank (megatron broadcasts the verdict),
but the three files only rank 0 writes raise on rank 0 alone while the other ranks wait in
the next collective: a hang until the distributed timeout, and no way to keep training.
:meth:`ShardedSave.write` runs the same steps with an agreement after each write that can fail
(:func:`agreed`): a failure anywhere raises :class:`SaveFailed` on every rank at the same
point, so the caller can remove the temporary directory and stop, or keep training.

The asynchronous save (``write(..., background=queue)``) is megatron's ``async_save`` of
the same strategy: the planning (collectives on the first two saves of a structure only:
:class:`SavePlans`) and the staging of GPU tensors in host memory happen in the call, the
shard writes in a process forked from the trainer (megatron's ``TemporalAsyncCaller``; the
fork freezes the CPU tensors it writes: training's later writes to them copy the pages
first), and :meth:`ShardedSave.finish` runs megatron's finalisation under the same
agreements once the ``AsyncCallsQueue`` reports every rank's writer done.

Helper processes: the shard writers' results travel through a multiprocessing Manager
queue that megatron starts with the ``spawn`` method (a server process, plus the
``resource_tracker`` it keeps alive). Killed with the worker (SIGKILL of torchrun's process
group), both were re-parented to init and lived forever. :func:`_results_queue` starts that
Manager itself, with ``PR_SET_PDEATHSIG`` set in it (it dies with the worker; the tracker
then sees its pipe close and exits too).
"""

from __future__ import annotations

import errno
import functools
import logging
import os
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
import torch.distributed as dist

from phoenix.checkpoint.writer_memory import fork_leaving_out
from phoenix.runtime.distributed import max_over_ranks, sum_over_ranks

NO_SPACE = (errno.ENOSPC, errno.EDQUOT)
_OK, _FAILED, _NO_SPACE, _NONFINITE = 0, 1, 2, 3  # agreed over the ranks by their maximum
VERDICT_PREFIX = ".nonfinite-rank_"
"""A forked writer's refusal of a non-finite state, in the temporary directory."""
_manager = None  # the Manager behind megatron's write-results queue (see _results_queue)


class NonFiniteState(Exception):
    """The state an asynchronous save's writer was handed holds NaN/Inf values; the
    message (one line) names the tensors."""


class SaveFailed(Exception):
    """A write of the save failed on some rank; raised on every rank at the same point.

    ``error``: this rank's own exception (None when another rank failed), ``no_space``:
    whether any rank's failure was a full file system or quota, ``nonfinite``: whether a
    rank's writer refused a non-finite state (:class:`NonFiniteState`)."""

    def __init__(self, error: Optional[BaseException], no_space: bool, nonfinite: bool = False):
        if isinstance(error, NonFiniteState):
            text = str(error)
        elif error is not None:
            text = first_line(error)
        elif nonfinite:
            text = "the weights or optimizer state hold non-finite values (on another rank)"
        else:
            text = "a write failed on another rank"
        super().__init__(text)
        self.error, self.no_space, self.nonfinite = error, no_space, nonfinite


def first_line(error: BaseException) -> str:
    """``Type: first line of the message`` of ``error`` (of the first rank's error, for
    torch's CheckpointException, which lists every rank's)."""
    failures = [f[0] for f in (getattr(error, "failures", None) or {}).values()
                if isinstance(f, tuple) and f and isinstance(f[0], BaseException)]
    if failures:
        error = failures[0]
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}".rstrip(": ")


def is_no_space(error: Optional[BaseException]) -> bool:
    """``error`` (or an exception it wraps: causes, and the per-rank failures of torch's
    CheckpointException, which travel as text) is a full file system or quota."""
    seen, todo = set(), [error]
    texts = tuple(os.strerror(e) for e in NO_SPACE)
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in NO_SPACE:
            return True
        if any(t in str(e) for t in texts):
            return True
        todo += [e.__cause__, e.__context__]
        todo += [f[0] for f in (getattr(e, "failures", None) or {}).values()
                 if isinstance(f, tuple) and f and isinstance(f[0], BaseException)]
    return False


def agreed(write: Callable[[], object], run_here: bool = True,
           refused: Optional[NonFiniteState] = None) -> None:
    """Run ``write()`` (where ``run_here``), then agree over every rank: raises SaveFailed
    on every rank when it failed on any. ``refused``: this rank's writer refused the state
    (it wrote nothing); that verdict wins over the write's own error (the same
    all-reduce). Collective."""
    error, failed = None, False
    if run_here:
        try:
            write()
        except Exception as e:
            error, failed = e, True
        except BaseException as e:  # torch's CheckpointException is a BaseException
            if type(e).__name__ != "CheckpointException":
                raise
            failed = True
            # megatron raises it on every rank; only rank 0's lists the failures
            error = e if getattr(e, "failures", None) else None
    verdict = _OK if not failed else _NO_SPACE if is_no_space(error) else _FAILED
    if refused is not None:
        error, verdict = refused, _NONFINITE
    verdict = max_over_ranks(verdict)
    if verdict != _OK:
        if verdict == _NONFINITE and not isinstance(error, NonFiniteState):
            error = None  # another rank's refusal is the reason, not this rank's echo of it
        raise SaveFailed(error, no_space=verdict == _NO_SPACE, nonfinite=verdict == _NONFINITE)


def _main_replicas(sharded: dict) -> list:
    """The tensor shards (megatron ``ShardedTensor``) this rank writes: the main replica of
    each, once the writes are distributed (:meth:`SavePlans.prepare`)."""
    from megatron.core.dist_checkpointing import ShardedTensor
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import is_main_replica

    return [sh for sh in nested_values(sharded) if isinstance(sh, ShardedTensor)
            and sh.data is not None and is_main_replica(sh.replica_id)]


def _results_queue() -> None:
    """Give megatron's shard writers a results queue whose Manager process dies with this
    one (see the module docstring); started once, from the thread that saves."""
    global _manager
    import multiprocessing as mp
    from multiprocessing.managers import SyncManager

    from megatron.core.dist_checkpointing.strategies import filesystem_async

    from phoenix.runtime.watchdog import die_with_parent

    if filesystem_async._results_queue is not None:
        return
    # The shard writers log a failed write as an error of their own (e.g. "Local process 0
    # encountered an error: ... unexpected pos"); the save reports it, once, in its words.
    logging.getLogger(filesystem_async.__name__).setLevel(logging.CRITICAL)
    _manager = SyncManager(ctx=mp.get_context("spawn"))  # megatron's choice of start method
    _manager.start(die_with_parent, (os.getpid(),))
    filesystem_async._results_queue = _manager.Queue()


class SavePlans:
    """megatron's save planning, kept across the saves of one state-dict structure.

    Each save of the same structure (the same keys, shapes, shards and dtypes on every rank:
    every periodic save of a run) would otherwise plan again what the previous one planned:
    the fully parallel distribution of the replicated shards and the check that every shard
    is written once (two gathers of every rank's shard metadata), and the torch_dist save
    plan with its global metadata (a gather of every rank's local plan). With one
    distribution wrapper (``do_cache_distribution``) and one strategy
    (``cached_metadata``: megatron's ``use_cached_ckpt_structure``) kept here, the first save
    plans, the second plans again and megatron checks that the plans are equal, and every
    later save reuses them without a planning collective (as Megatron-LM's ``--ckpt-assume-constant-
    structure`` does).

    Reuse is agreed: :meth:`prepare` compares this rank's structure with the previous save's
    and one all-reduce decides for every rank; a structure changed on any rank (the step-0
    save has no optimizer state) starts over on every rank, so no rank waits in a gather
    the others skip. A failed save starts over too (:meth:`forget`)."""

    def __init__(self):
        self.structure: Optional[list] = None
        self.wrapper = self.strategy = None
        self.bytes: Optional[int] = None
        self.reused = False
        """Whether the last :meth:`prepare` reuses megatron's plans (no planning collective)."""

    def prepare(self, sharded: dict) -> int:
        """Spread the writes of ``sharded`` over the ranks (reusing the previous
        distribution when the structure is the same everywhere); returns the tensor bytes
        the save writes over all ranks. Collective."""
        from megatron.core.dist_checkpointing.strategies.fully_parallel import (
            FullyParallelSaveStrategyWrapper,
        )

        structure = _structure(sharded)
        same = self.strategy is not None and structure == self.structure
        validated = same and bool(self.strategy.validated_cache_reuse)
        # one all-reduce: ranks whose structure changed, times (world + 1), plus ranks where
        # megatron validated its cached plan (which must be all or none)
        world = dist.get_world_size() if dist.is_initialized() else 1
        verdict = int(sum_over_ranks((not same) * (world + 1) + validated))
        self.reused = verdict == world
        if verdict not in (0, world):
            # Spread the writes of replicated tensors (the model shard every data-parallel
            # rank holds) evenly over the ranks holding them (megatron's
            # FullyParallelSaveStrategyWrapper, over the world group as megatron defaults
            # to): otherwise DP rank 0 stages and writes the whole model shard besides its
            # own optimizer shard, and bounds the save's time and host memory.
            self.strategy = _agreeing_strategy()("torch_dist", 1, cached_metadata=True)
            self.wrapper = FullyParallelSaveStrategyWrapper(self.strategy,
                                                            do_cache_distribution=True)
            self.bytes = None
        self.structure = structure
        self.wrapper.apply_saving_parallelization(sharded)
        if self.bytes is None:
            self.bytes = int(sum_over_ranks(sum(sh.data.numel() * sh.data.element_size()
                                                for sh in _main_replicas(sharded))))
        return self.bytes

    def forget(self) -> None:
        """Plan the next save from scratch (after a failed one). Every rank calls it."""
        self.__init__()


def _structure(sharded: dict) -> list:
    """What megatron's save plan depends on: every shard's key, placement, shape and dtype
    (not the values)."""
    from megatron.core.dist_checkpointing import ShardedObject, ShardedTensor
    from megatron.core.dist_checkpointing.dict_utils import nested_values

    out = []
    for sh in nested_values(sharded):
        if isinstance(sh, ShardedTensor):
            out.append((sh.key, str(sh.dtype), tuple(sh.local_shape), tuple(sh.global_shape),
                        tuple(sh.global_offset), tuple(sh.axis_fragmentations or ()),
                        sh.replica_id, sh.flattened_range, sh.prepend_axis_num))
        elif isinstance(sh, ShardedObject):
            out.append((sh.key, tuple(sh.global_shape), tuple(sh.global_offset), sh.replica_id))
        else:
            out.append(type(sh).__name__)
    return out


def _alias_cpu_views(sharded: dict) -> None:
    """Give every contiguous CPU shard that is a view into a larger tensor (the model's
    parameters in their contiguous buffer, the optimizer's bucket slices) a storage of
    exactly its own bytes over the same memory, in place of megatron's copy.

    megatron's writer copies such views (``torch.save`` of a view would write its whole
    storage): on the saving step, a copy of most of the state. Over the same memory, nothing
    is copied and the values written are the same; the forked writer of an asynchronous save
    still writes the values of the saving step (the fork freezes the memory it sees, as it
    already did for the shards that are not views). GPU tensors are staged by megatron's
    copy to the host, as before."""
    from megatron.core.dist_checkpointing import ShardedTensor
    from megatron.core.dist_checkpointing.dict_utils import nested_values

    for sh in nested_values(sharded):
        t = getattr(sh, "data", None) if isinstance(sh, ShardedTensor) else None
        if (t is None or t.device.type != "cpu" or not t.is_contiguous() or t.numel() == 0
                or t.untyped_storage().nbytes() == t.numel() * t.element_size()):
            continue
        raw = t.detach().reshape(-1).view(torch.uint8).numpy()  # the same memory
        sh.data = torch.from_numpy(raw).view(t.dtype).view(t.shape)


class ShardedSave:
    """One save of a sharded state dict (megatron ``ShardedTensor``/``ShardedObject``
    leaves; model and optimizer) in megatron's ``torch_dist`` format.

    Construction prepares it (megatron's factories and sharding checks) and measures
    :attr:`bytes`, the tensor data it writes over all ranks: what it needs on disk, less a
    few KB of metadata. :meth:`write` writes it. Both are collective."""

    def __init__(self, sharded_state_dict: dict, rank: int, plans: Optional["SavePlans"] = None):
        from megatron.core.dist_checkpointing.state_dict_utils import save_preprocess

        self.rank = rank
        # the access integrity (every shard written once) is validated by the distribution
        # (SavePlans.prepare), after it has chosen the writers: one gather of the shards'
        # metadata, not two (and none on a save that reuses the distribution)
        self.sharded, self.common = save_preprocess(sharded_state_dict,
                                                    validate_access_integrity=False)
        self._plans = plans if plans is not None else SavePlans()
        self.bytes = self._plans.prepare(self.sharded)

    def nonfinite(self) -> list[str]:
        """Checkpoint keys of the tensors this rank writes (the main replicas, after the
        distribution of the writes) that hold a NaN or Inf; empty when all are finite.
        Not collective."""
        from phoenix.optim.nonfinite import nonfinite_names

        return nonfinite_names((sh.key, sh.data) for sh in _main_replicas(self.sharded))

    def write(self, checkpoint_dir: Path, background=None,
              check_finite: bool = False, unneeded: Sequence[torch.Tensor] = (),
              prepare_dir: Optional[Callable[[], object]] = None) -> None:
        """``dist_checkpointing.save`` into the existing, empty ``checkpoint_dir``, raising
        :class:`SaveFailed` on every rank when any write fails (module docstring).

        ``background``: a megatron ``AsyncCallsQueue``. The save is then planned here and its
        shards handed to a forked writer process scheduled on the queue (megatron's
        ``async_save``: the tensors are staged in host memory first, so training may change
        them afterwards); :meth:`finish` completes it once the queue reports the writers
        done on every rank.

        ``check_finite`` (background only; CPU state): the forked writer checks that every
        tensor this rank writes is finite before it writes anything (every shard is written
        by one rank: over the ranks, the whole checkpoint is checked). The fork sees the
        memory of the saving step, so the check is off the training process's critical
        path. A refusal writes nothing and fails the save in :meth:`finish` on every rank,
        as a failed write does.

        ``unneeded`` (background only): the training state's CPU tensors (their whole
        storages: the weights' and gradients' contiguous buffers, the optimizer's state).
        The fork that starts the writer maps only the pages of them this rank writes
        (phoenix.checkpoint.writer_memory): a faster fork, and no copy-on-write of the rest
        while the writer lives.

        ``prepare_dir``: run by rank 0 before it writes ``common.pt`` (making the directory),
        under the same agreement. :meth:`finish` completes every write."""
        from megatron.core.dist_checkpointing.serialization import get_default_save_common_strategy

        _results_queue()
        rank0 = self.rank == 0

        def common():
            if prepare_dir is not None:
                prepare_dir()
            get_default_save_common_strategy().save_common(self.common, checkpoint_dir)

        agreed(common, run_here=rank0)
        strategy = self._plans.strategy
        strategy.metadata_error = None  # the strategy lives across saves (SavePlans)
        self._dir, self._strategy = checkpoint_dir, strategy
        self._refused, self._verdict = None, None
        _alias_cpu_views(self.sharded)
        if background is None:
            # shards, then .metadata (its failure is kept on rank 0: finish() raises it)
            agreed(lambda: strategy.save(self.sharded, checkpoint_dir))
            self._finalize_fns = []
            return
        try:
            # one agreement for the plan and the start of the writer (a collective less on
            # the saving step); a failure on any rank stops the writers the others started
            agreed(lambda: self._schedule(strategy, checkpoint_dir, background, check_finite,
                                          unneeded))
        except SaveFailed:
            for call in background.async_calls:
                call.async_caller.close(abort=True)
            background.async_calls.clear()
            raise

    def _schedule(self, strategy, checkpoint_dir: Path, background, check: bool,
                  unneeded: Sequence[torch.Tensor]) -> None:
        """megatron's ``async_save`` plan of the shards, and its writer started on the queue."""
        from megatron.core.dist_checkpointing.strategies.async_utils import AsyncRequest

        request = strategy.async_save(self.sharded, checkpoint_dir)
        # megatron's finalisation (gather the write results, rank 0 writes .metadata) runs in
        # finish(), under agreement; the queue only runs and watches the writer process.
        self._finalize_fns = list(request.finalize_fns)
        writer = None
        if request.async_fn is not None:  # this rank writes something
            if check:
                self._verdict = checkpoint_dir / f"{VERDICT_PREFIX}{self.rank:05d}"
            writer = functools.partial(_writer_dying_with, os.getpid(), request.async_fn,
                                       check, self._verdict)
        written = [t for _, t in _written_tensors(request.async_fn_args[1])] if writer else []
        with fork_leaving_out(unneeded if writer else (), written):  # no writer: no fork
            background.schedule_async_request(
                AsyncRequest(writer, request.async_fn_args, [], request.async_fn_kwargs,
                             preload_fn=request.preload_fn))

    def finish(self, also: Optional[Callable[[], object]] = None) -> None:
        """Complete the write (see :meth:`write`; a background one once its writers are
        done on every rank): megatron's finalisation of a background write, then rank 0's
        ``.metadata`` verdict and ``metadata.json``, then ``also()`` (the caller's files of
        this rank), under one agreement: raises SaveFailed on every rank when a shard,
        these files or ``also`` failed, or a writer refused the state. Collective."""
        from megatron.core.dist_checkpointing.core import CheckpointingConfig, save_config

        fns, self._finalize_fns = self._finalize_fns, []
        refused = self._refused
        if refused is None and self._verdict is not None and self._verdict.exists():
            refused = NonFiniteState(self._verdict.read_text().strip())
        strategy = self._strategy

        def complete():
            for fn in fns:  # collective; raises the writers' errors on every rank
                fn()
            if self.rank == 0:
                strategy.raise_metadata_error()
                save_config(CheckpointingConfig(strategy.backend, strategy.version),
                            str(self._dir))
            if also is not None:
                also()

        agreed(complete, refused=refused)


def _written_tensors(write_buckets) -> list:
    """``(checkpoint key, tensor)`` of every tensor in megatron's write buckets (``(file,
    storage key, (bytes items, [(WriteItem, tensor), ...]))``)."""
    return [(item.index.fqn, t) for _, _, (_, tensors) in write_buckets or ()
            for item, t in tensors]


def _writer_dying_with(parent: int, write: Callable, check: bool, verdict: Optional[Path],
                       *args, **kwargs):
    """The forked shard writer: killed with the training process (a writer that outlived a
    killed job could write into a temporary directory the next job sweeps). With ``check``
    it first checks that the tensors it writes (``args``: rank, write buckets, queue; the
    saving step's memory: a fork) are finite; on a refusal it writes no shard, hands
    megatron's results queue an error in place of its results, so that megatron's
    finalisation fails on every rank, and leaves the reason in ``verdict`` for
    :meth:`ShardedSave.finish`."""
    from phoenix.optim.nonfinite import nonfinite_names, nonfinite_reason
    from phoenix.runtime.watchdog import die_with_parent

    die_with_parent(parent)
    if check:
        torch.set_num_threads(1)  # OpenMP's thread pool does not survive a fork
        bad = nonfinite_names(_written_tensors(args[1]))
        reason = nonfinite_reason(bad) if bad else None
        if reason:
            if args and args[-1] is not None:
                args[-1].put(RuntimeError(reason))
            verdict.write_text(reason + "\n")
            return None
    return write(*args, **kwargs)


_STRATEGY = None


def _agreeing_strategy():
    """The strategy class (built on first use: megatron is imported lazily, after the
    device backend is chosen)."""
    global _STRATEGY
    if _STRATEGY is not None:
        return _STRATEGY
    from megatron.core.dist_checkpointing.strategies.torch import TorchDistSaveShardedStrategy

    class AgreeingTorchDistSave(TorchDistSaveShardedStrategy):
        """megatron's torch_dist save in which rank 0's failure to write ``.metadata`` is
        kept (:meth:`raise_metadata_error` raises it) instead of raised while the other
        ranks wait in megatron's broadcast of the shards' verdict."""

        metadata_error: Optional[BaseException] = None

        def _get_save_and_finalize_callbacks(self, writer, save_state_dict_ret):
            finish = writer.finish

            def finish_or_keep(*args, **kwargs):
                try:
                    return finish(*args, **kwargs)
                except Exception as e:
                    self.metadata_error = e

            writer.finish = finish_or_keep
            return super()._get_save_and_finalize_callbacks(writer, save_state_dict_ret)

        def raise_metadata_error(self) -> None:
            if self.metadata_error is not None:
                raise self.metadata_error

    _STRATEGY = AgreeingTorchDistSave
    return _STRATEGY
