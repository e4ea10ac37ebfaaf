"""Save and load checkpoints so that none is ever half-written as "latest".

Layout of a run's ``checkpoints/`` directory::

    step_000100/             one complete checkpoint
        (dist_checkpointing files: model + optimizer, sharded, reshardable)
        phoenix_state.pt     the state bundle (step, trainer, scheduler, monitors: see
                             phoenix.checkpoint.checkpointer), written last
        rng/rank_00003.pt    per-rank RNG states (restored when the layout matches)
        config.yaml          the resolved config that wrote it
    latest                   text file: the name of the newest complete checkpoint

A save writes everything into ``.tmp-step_000100`` first; only after every rank has
finished does rank 0 rename it to ``step_000100`` (atomic on a POSIX filesystem) and
then replace ``latest`` (write-then-rename). A kill at any moment therefore leaves
either the previous checkpoint as latest or the new one fully written. Resume takes the
newest ``step_*`` directory that holds ``phoenix_state.pt`` (written last, inside the
temporary directory). Multi-node runs need a filesystem shared by all nodes.

With ``background`` (``checkpoint.async_save``) the shards are staged in host memory and
written by forked processes while training goes on; everything after them (megatron's
``.metadata``, RNG states, config, bundle, rename, ``latest``, keep_last) happens in
:meth:`CheckpointStore.finish_pending`, at a later step, once every rank's writer is done.
A job killed in between leaves the previous checkpoint as latest and the temporary
directory for the next job to sweep.

A write that fails on any rank (a full disk, a quota) fails the save on every rank at the
same point: the temporary directory is removed, the previous checkpoint is untouched, and
:class:`~phoenix.checkpoint.save_failures.CheckpointSaveError` says so in one line. Before
each save rank 0 warns when the free space is less than the save needs.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from phoenix.checkpoint.save_failures import (
    TMP_PREFIX,
    CheckpointSaveError,
    SaveSpace,
    nearly_full,
)
from phoenix.checkpoint.optimizer_format import FULLY_RESHARDABLE, saved_format, sharding_metadata
from phoenix.checkpoint.sharded_save import SaveFailed, SavePlans, ShardedSave, agreed
from phoenix.checkpoint.writer_memory import training_tensors
from phoenix.io import atomic_write_text
from phoenix.model import unwrap
from phoenix.runtime.distributed import any_rank, max_over_ranks

log = logging.getLogger(__name__)

STATE_FILE = "phoenix_state.pt"
_STEP_DIR = re.compile(r"^step_(\d{6,})$")



def _merge(a: dict, b: dict) -> dict:
    """``a`` updated by ``b``, nested mappings merged key by key."""
    out = dict(a)
    for k, v in b.items():
        out[k] = _merge(out[k], v) if isinstance(out.get(k), dict) and isinstance(v, dict) else v
    return out


def fit_chained_optimizer_state(state: dict, n: int) -> dict:
    """Fit a loaded optimizer state to an optimizer of ``n`` chained parts.

    With expert parallelism megatron chains a dense and an expert optimizer; their tensor
    state is keyed by parameter (``chained_optim_avoid_prefix``) and reshards, but their
    non-tensor part (param groups, saved by rank 0) keeps the saving layout's nesting:
    ``{0: {...}, 1: {...}}`` for a chain, ``{"optimizer": ..., ...}`` for one optimizer.
    The param groups are matched by megatron through (wd_mult, lr_mult,
    is_expert_parallel, is_decoupled_lr); the hyperparameters in them are the schedule's,
    which the scheduler sets again every step. Same nesting: returned unchanged.
    """
    parts = sorted(k for k in state if isinstance(k, int))
    if (n > 1) == bool(parts):
        return state
    rest = {k: v for k, v in state.items() if not isinstance(k, int)}
    if parts:  # a chain (EP > 1) loaded by one optimizer (EP = 1): one set of groups
        groups = [g for k in parts for g in state[k]["optimizer"]["param_groups"]]
        common = _merge(state[parts[0]], {"optimizer": {"param_groups": groups}})
        return _merge(common, rest)
    # One optimizer loaded by a chain: every part may look up every group, as an expert
    # group (is_expert_parallel) or not.
    groups = [{**g, "is_expert_parallel": flag} for g in rest["optimizer"]["param_groups"]
              for flag in (False, True)]
    common = _merge({k: v for k, v in rest.items() if k in ("optimizer", "param_state_sharding_type")},
                    {"optimizer": {"param_groups": groups}})
    return {i: _merge(common, state[i]) for i in range(n)}


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete or incompatible; the message names it."""


def _is_complete(path: Path) -> bool:
    return (path / STATE_FILE).is_file() and (path / "metadata.json").is_file()


def checkpoint_root(output_dir: str | os.PathLike) -> Path:
    """Where a run directory keeps its checkpoints."""
    return Path(output_dir) / "checkpoints"


def step_of(path: str | os.PathLike) -> int:
    """The step of a ``step_NNNNNN`` checkpoint directory."""
    m = _STEP_DIR.match(Path(path).name)
    if m is None:
        raise CheckpointError(f"{path} is not a step_NNNNNN checkpoint directory")
    return int(m.group(1))


def find_latest(root: str | os.PathLike) -> Path | None:
    """Newest complete ``step_*`` checkpoint under ``root`` (None if there is none)."""
    root = Path(root)
    if not root.is_dir():
        return None
    steps = []
    for child in root.iterdir():
        m = _STEP_DIR.match(child.name)
        if m and child.is_dir() and _is_complete(child):
            steps.append((int(m.group(1)), child))
    return max(steps)[1] if steps else None


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A checkpoint directory, or a run/checkpoints directory whose latest is taken."""
    path = Path(path)
    if _is_complete(path):
        return path
    for root in (path, path / "checkpoints"):
        latest = find_latest(root)
        if latest is not None:
            return latest
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    raise CheckpointError(f"no complete checkpoint in {path} (a complete one holds {STATE_FILE} "
                          f"and metadata.json)")


def read_checkpoint_state(path: str | os.PathLike) -> dict:
    """The trainer state a complete checkpoint holds (step, has_optimizer, ...)."""
    return torch.load(Path(path) / STATE_FILE, weights_only=False)


def _model_sharded_state_dict(model_chunks) -> dict:
    """The model's dist_checkpointing dict: one chunk's own, or ``{"chunk0": ..., ...}``
    for a virtual pipeline's chunks (as Megatron-LM's ``model0``, ``model1``). The nesting
    does not reach the files: every tensor is stored under its global key (a layer's
    weights in the stack of all ``num_layers``, at the offset megatron gives the chunk's
    ``vp_stage``), so a checkpoint of any pipeline / virtual pipeline size loads at any
    other."""
    if len(model_chunks) == 1:
        return unwrap(model_chunks[0]).sharded_state_dict()
    return {f"chunk{i}": unwrap(chunk).sharded_state_dict() for i, chunk in enumerate(model_chunks)}


def _load_model_state(model_chunks, loaded: dict) -> None:
    """Copy a loaded model dict (nested as :func:`_model_sharded_state_dict`) into the chunks."""
    if len(model_chunks) == 1:
        unwrap(model_chunks[0]).load_state_dict(loaded)
        return
    for i, chunk in enumerate(model_chunks):
        unwrap(chunk).load_state_dict(loaded[f"chunk{i}"])


def _rng_state() -> dict:
    from megatron.core import tensor_parallel

    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
        "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }


def _set_rng_state(state: dict) -> None:
    from megatron.core import tensor_parallel

    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def _fresh_dir(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists():  # left by a crash during an earlier save of this step
        shutil.rmtree(path)
    path.mkdir()


def _save_rng(tmp: Path, rank: int, state: dict) -> None:
    (tmp / "rng").mkdir(exist_ok=True)  # after the shards: megatron wants an empty dir
    torch.save(state, tmp / "rng" / f"rank_{rank:05d}.pt")


def _rename_into_place(tmp: Path, final: Path, config_yaml: str, bundle: dict) -> None:
    """Rank 0: the config and the state bundle (written last: it marks the directory
    complete), then the rename into place."""
    (tmp / "config.yaml").write_text(config_yaml)
    torch.save(bundle, tmp / STATE_FILE)
    if final.exists():  # an older save of the same step (e.g. after a rollback)
        shutil.rmtree(final)
    os.replace(tmp, final)


@dataclass
class _SaveJob:
    """One save between its start and its publication (a background one lives across steps)."""

    step: int
    tmp: Path
    final: Path
    save: ShardedSave
    bundle: dict
    """The state bundle as it was at the step saved (a copy: training goes on)."""
    rng: dict
    """This rank's RNG states at the step saved."""
    config_yaml: str
    space: Optional[SaveSpace]
    previous: Optional[Path]

    @property
    def name(self) -> str:
        return self.final.name


class CheckpointStore:
    """Saves/loads this run's checkpoints under ``root``; every rank calls every method."""

    def __init__(self, root: str | os.PathLike, rank: int, world_size: int, keep_last: int = 0):
        self.root = Path(root)
        self.rank, self.world_size = rank, world_size
        self.keep_last = keep_last
        self.pending: Optional[_SaveJob] = None
        """The background save whose writers may still run (see :meth:`finish_pending`)."""
        self._queue = None  # megatron's AsyncCallsQueue, made at the first background save
        self._plans = SavePlans()  # megatron's save plans, reused across saves (see SavePlans)
        self._polls = 0  # non-blocking polls of the pending save so far
        self._polls_skipped = 0
        """Polls of a pending save that skip the collective check: the checks resume one
        poll before the one at which the previous save's writers were found done (the same
        count on every rank: that verdict was agreed)."""

    # -- save ----------------------------------------------------------------------
    def save(self, step: int, model_chunks, optimizer, state: dict, config_yaml: str, *,
             optimizer_format: str = FULLY_RESHARDABLE, layout: Optional[dict] = None,
             background: bool = False) -> Optional[Path]:
        """Write checkpoint ``step``: model (and optimizer, unless None, in
        ``optimizer_format``; see phoenix.checkpoint.optimizer_format) sharded by
        dist_checkpointing, per-rank RNG states, ``config_yaml`` and the ``state`` bundle
        (with the format and ``layout``, the optimizer_format's layout record), in a
        temporary directory that is renamed into place once every rank is done.

        ``background``: megatron's asynchronous save; returns None once the shards are
        staged and their writer runs, and :meth:`finish_pending` publishes it later.
        Otherwise returns the published checkpoint.

        Raises CheckpointSaveError on every rank when a write fails on any (a full disk,
        a quota, an I/O error): the temporary directory is removed and the previous
        checkpoint is left as it was."""
        from phoenix.optim.nonfinite import nonfinite_reason

        if self.pending is not None:
            raise RuntimeError(f"checkpoint {self.pending.name} is still being written; "
                               f"finish_pending(block=True) first")
        name = f"step_{step:06d}"
        model_sd = _model_sharded_state_dict(model_chunks)
        sharded = {"model": model_sd}
        bundle = dict(state, world_size=self.world_size, has_optimizer=optimizer is not None)
        if optimizer is not None:
            sharded["optimizer"] = optimizer.sharded_state_dict(
                model_sd, is_loading=False, metadata=sharding_metadata(optimizer_format))
            bundle.update(optimizer_format=optimizer_format, optimizer_layout=layout)
        rank0, previous = self.rank == 0, self.latest()
        save = ShardedSave(sharded, self.rank, self._plans)
        # Never publish NaN/Inf weights or optimizer state: each rank checks the tensors it
        # writes and one all-reduce combines the verdicts. A synchronous save (or a GPU
        # state) checks here and writes nothing on failure; an asynchronous save of CPU
        # state checks in its forked writer, which sees this step's memory (off the training
        # process's critical path), and a refusal fails the save like a failed write
        # (CheckpointSaveError, checkpoint.on_save_error): nothing published, the temporary
        # directory removed. (A forked writer reads host memory; GPU memory it cannot.)
        held = training_tensors(model_chunks, optimizer)
        in_writer = background and all(t.device.type == "cpu" for t in held)
        if not in_writer:
            bad = save.nonfinite()
            if any_rank(bool(bad)):
                raise CheckpointError(f"refusing to save checkpoint step {step}: "
                                      f"{nonfinite_reason(bad)}; the last good checkpoint "
                                      f"stays {self.latest()}")
        space = SaveSpace.measure(self.root, save.bytes, previous) if rank0 else None
        if space is not None and not space.fits:
            log.warning("checkpoint %s: %s; the save will likely fail (the previous checkpoint "
                        "stays intact)", name, space.describe())
        job = _SaveJob(step, self.root / f"{TMP_PREFIX}{name}", self.root / name, save,
                       copy.deepcopy(bundle), _rng_state(), config_yaml, space, previous)
        if background and self._queue is None:
            from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue

            self._queue = AsyncCallsQueue()
        with self._failing(job):
            save.write(job.tmp, background=self._queue if background else None,
                       check_finite=in_writer,
                       unneeded=held if in_writer else (),
                       prepare_dir=lambda: _fresh_dir(job.tmp))
        if background:
            self.pending, self._polls = job, 0
            return None
        return self._publish(job)

    def finish_pending(self, block: bool) -> Optional[Path]:
        """Publish the background save once its writers are done on every rank (waiting
        for them with ``block``); returns its path, or None when there is none or it is
        still being written. Collective (one all-reduce when not blocking, except in the
        first polls of a save, while the previous save's writers were still running).
        Raises CheckpointSaveError like :meth:`save` when a write failed."""
        if self.pending is None:
            return None
        if not block:
            # Each check is an all-reduce on the training path; the writers of the last save
            # took a known number of polls, so the first ones of this save are skipped
            # (every rank counts the same polls: no collective is left unmatched)
            self._polls += 1
            if self._polls <= self._polls_skipped:
                return None
        if not self._queue.maybe_finalize_async_calls(blocking=block):
            return None
        if not block:
            self._polls_skipped = self._polls - 2
        job, self.pending = self.pending, None
        return self._publish(job)

    def abandon_pending(self) -> None:
        """Stop the background save's writer without publishing it (the job is failing;
        its temporary directory is swept by the next job)."""
        if self.pending is None:
            return
        for call in self._queue.async_calls:
            call.async_caller.close(abort=True)
        self._queue.async_calls.clear()
        self.pending = None

    def _publish(self, job: _SaveJob) -> Path:
        """The end of a save: megatron's metadata, RNG states, config, bundle, the rename
        into place, ``latest`` and keep_last. Collective."""
        rank0 = self.rank == 0

        def publish():  # rank 0, once every rank's files are written
            _rename_into_place(job.tmp, job.final, job.config_yaml, job.bundle)
            try:
                atomic_write_text(self.root / "latest", job.name + "\n")
            except OSError as e:  # the checkpoint is complete: resume finds it without `latest`
                log.warning("checkpoint %s is saved, but %s was not updated: %s", job.name,
                            self.root / "latest", e)
            try:
                self._prune()
            except OSError as e:  # the checkpoint is published; an old one stays
                log.warning("checkpoint %s is saved, but older ones were not pruned: %s",
                            job.name, e)

        # two collectives: every rank's part (megatron's metadata, the RNG states), then
        # rank 0's rename, `latest` and keep_last (the agreement returns on every rank after
        # them: no barrier needed)
        with self._failing(job):
            job.save.finish(also=lambda: _save_rng(job.tmp, self.rank, job.rng))
            agreed(publish, run_here=rank0)
        return job.final

    @contextlib.contextmanager
    def _failing(self, job: _SaveJob):
        """A SaveFailed inside (raised on every rank at once) removes the temporary
        directory and becomes one CheckpointSaveError on every rank."""
        try:
            yield
        except SaveFailed as e:
            self._plans.forget()  # the plans may be half-updated; every rank is here
            rank0 = self.rank == 0
            # A full disk is said once, by rank 0; torch.save reports one without an errno
            # ("unexpected pos"), so rank 0 also looks at the free space (before the removal).
            full = bool(max_over_ranks(e.no_space or (rank0 and nearly_full(self.root))))
            if rank0:
                shutil.rmtree(job.tmp, ignore_errors=True)
            if not full and e.error is not None:  # rank 0's line says "on another rank"
                log.warning("checkpoint %s: %s: %s", job.name, "refused on this rank" if
                            e.nonfinite else "this rank's write failed", e)
            raise CheckpointSaveError(job.step, self.root, str(e), full, job.space,
                                      job.previous) from None

    def _prune(self) -> None:
        if self.keep_last <= 0:
            return
        steps = sorted(p for p in self.root.iterdir() if _STEP_DIR.match(p.name) and _is_complete(p))
        for old in steps[: -self.keep_last]:
            shutil.rmtree(old, ignore_errors=True)

    # -- load ----------------------------------------------------------------------
    def latest(self) -> Path | None:
        return find_latest(self.root)

    def load(self, path: Path, model_chunks, optimizer, bundle: dict | None = None,
             load_rng: bool = True) -> dict:
        """Load model + optimizer (resharding as needed). ``bundle``: the checkpoint's state
        bundle as the caller already read it (read here when None); returned."""
        from megatron.core import dist_checkpointing

        if not _is_complete(path):
            raise CheckpointError(f"checkpoint {path} is incomplete")
        state = bundle if bundle is not None else read_checkpoint_state(path)
        if not state.get("has_optimizer", True):
            optimizer = None  # e.g. the step-0 checkpoint: Adam has no state before step 1
        model_sd = _model_sharded_state_dict(model_chunks)
        sharded = {"model": model_sd}
        if optimizer is not None:
            from phoenix.optim.builder import ensure_optimizer_state

            ensure_optimizer_state(optimizer)
            # the format the checkpoint records (older ones: fully_reshardable)
            metadata = sharding_metadata(saved_format(state))
            sharded["optimizer"] = optimizer.sharded_state_dict(model_sd, is_loading=True,
                                                             metadata=metadata)
        loaded = dist_checkpointing.load(sharded, str(path))
        _load_model_state(model_chunks, loaded["model"])
        if optimizer is not None:
            n = len(getattr(optimizer, "chained_optimizers", [optimizer]))
            # megatron's dp_reshardable load copies into the fp32 main parameters (leaves
            # that require grad) outside no_grad, which autograd refuses
            with torch.no_grad():
                optimizer.load_state_dict(fit_chained_optimizer_state(loaded["optimizer"], n))
        rng_file = path / "rng" / f"rank_{self.rank:05d}.pt"
        if load_rng and state.get("world_size") == self.world_size and rng_file.is_file():
            _set_rng_state(torch.load(rng_file, weights_only=False))
        elif load_rng and self.rank == 0:
            log.info("checkpoint: saved on %s ranks, loading on %s: RNG states are reseeded, "
                     "not restored", state.get("world_size"), self.world_size)
        return state

    def check_compatible(self, path: Path, model_chunks) -> None:
        """Raise CheckpointError listing every weight whose global shape differs from the
        model's (or that the checkpoint lacks): a model config that does not match the
        checkpoint fails here, with names and shapes, not inside the loader."""
        from megatron.core.dist_checkpointing import ShardedTensor, load_tensors_metadata
        from megatron.core.dist_checkpointing.dict_utils import nested_values

        saved = load_tensors_metadata(str(path))
        problems = []
        for sh in nested_values(_model_sharded_state_dict(model_chunks)):
            if not isinstance(sh, ShardedTensor):
                continue
            if sh.key not in saved:
                problems.append(f"{sh.key}: not in the checkpoint")
            elif tuple(saved[sh.key].global_shape) != tuple(sh.global_shape):
                problems.append(f"{sh.key}: the model has shape {tuple(sh.global_shape)}, the "
                                f"checkpoint {tuple(saved[sh.key].global_shape)}")
        if problems:
            vocab_rows = ("embedding.word_embeddings.weight", "output_layer.weight")
            if all(p.startswith(vocab_rows) and "shape" in p for p in problems):
                problems.append("(only the vocabulary rows differ: a checkpoint is resized to a "
                                "new tokenizer with phoenix expand-vocab --checkpoint)")
            shown = "\n  ".join(sorted(set(problems))[:8])
            more = f"\n  ... and {len(set(problems)) - 8} more" if len(set(problems)) > 8 else ""
            raise CheckpointError(
                f"the model config does not match checkpoint {path} ({len(set(problems))} weights "
                f"differ; compare model.* with {path / 'config.yaml'}):\n  {shown}{more}")

    def load_weights(self, path: Path, model_chunks) -> dict:
        """Model weights only (continual pretraining / comparisons from a fixed start)."""
        from megatron.core import dist_checkpointing

        model_sd = _model_sharded_state_dict(model_chunks)
        loaded = dist_checkpointing.load({"model": model_sd}, str(path))
        _load_model_state(model_chunks, loaded["model"])
        return read_checkpoint_state(path)
