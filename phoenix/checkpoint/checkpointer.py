"""The run's checkpointer: cadence, retention, resume, ``init_from`` and the state bundle.

The trainer hands the checkpointer its model, optimizer and every stateful object under
a stable key (``trainer``, ``scheduler``, and each callback's ``state_key``); the loop
then only calls :meth:`Checkpointer.save` after each step and at the end. Where a run
starts from is decided once, before any model is built, by :func:`plan_restore`:

* ``resume``: this run's newest complete checkpoint (``checkpoint.resume``, the default);
* ``init_from``: model weights (and with ``init_optimizer`` the Adam state) of another
  run, with the schedule, data and stages starting at step 0;
* ``fresh``: neither.

Bundle format (``phoenix_state.pt`` of a checkpoint, written last)::

    {"format": 2, "step": N, "world_size": W, "has_optimizer": bool,
     "states": {"trainer": {...}, "scheduler": {...}, "dataset_loss": {...}, ...}}

Format 1 (written before the checkpointer existed) had ``trainer``, ``scheduler``,
``data``, ``config`` and ``callbacks`` (keyed by class name) at the top level. It is
read and converted (:func:`upgrade_bundle`); what cannot be converted is refused with a
message naming the format version, never a KeyError. The data position is not stored:
it is a pure function of the trainer's step (the data plan is deterministic).
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional, Protocol

from phoenix.checkpoint.store import (
    CheckpointError,
    CheckpointStore,
    checkpoint_root,
    find_latest,
    read_checkpoint_state,
    resolve_checkpoint,
    step_of,
)
from phoenix.checkpoint.optimizer_format import layout_problem, layout_record
from phoenix.checkpoint.resume_contract import check_resume, record_changes, rope_changes
from phoenix.checkpoint.save_failures import CheckpointSaveError
from phoenix.config import ConfigError, RunConfig
from phoenix.model.param_sync import gathered_params

log = logging.getLogger(__name__)

FORMAT_VERSION = 3

# Format 1 keyed callback state by class name; the stable keys that replaced them.
_V1_CALLBACK_KEYS = {"DatasetLossMonitor": "dataset_loss"}


class Stateful(Protocol):
    """What the checkpointer saves and restores under a key."""

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


@dataclass(frozen=True)
class RestorePlan:
    """Where a run starts from; decided from the file system before a model is built."""

    kind: Literal["resume", "init_from", "fresh"]
    path: Optional[Path] = None
    """The checkpoint to read (None for ``fresh``)."""
    honoured: tuple = ()
    """Resume: the config changes applied from the resume step on (ConfigChange items);
    init_from: the RoPE changes against the source's config."""
    old_config: Optional[RunConfig] = None
    """Resume: the config the checkpoint was trained with."""
    data_changed: tuple = ()
    """Resume: changes to the data of begun stages (an implicit stage boundary)."""
    bundle: Optional[dict] = None
    """Resume and init_from: the checkpoint's state bundle, in the current format (read
    once, here)."""

    @property
    def start_step(self) -> int:
        """The step the run starts from: the checkpoint's (its bundle's ``step``, the one
        place a step is read from) on resume, else 0."""
        return int(self.bundle["step"]) if self.kind == "resume" else 0

    @property
    def data_resume(self) -> Optional[dict]:
        """Resume: the implicit stage boundary the checkpoint's run already had, if any
        (the data layer's ``"data"`` state)."""
        return (self.bundle or {}).get("states", {}).get("data", {}).get("data_resume")


def plan_restore(cfg: RunConfig, vocab_size: Optional[int] = None) -> RestorePlan:
    """Decide resume / init_from / fresh for ``cfg``, checking ``checkpoint.init_from``
    (exists, complete, not inside this run, has optimizer state when asked for, built for
    this run's vocabulary ``vocab_size``: the trainer's resolved one; None: derived here).

    Raises CheckpointError or ConfigError naming the key and the path."""
    ckpt = cfg.checkpoint
    latest = find_latest(checkpoint_root(cfg.output_dir)) if ckpt.resume else None
    if latest is not None:
        # Every config change is honoured or refused here, before any work.
        decision = check_resume(latest, cfg, step_of(latest))
        bundle = upgrade_bundle(read_checkpoint_state(latest), latest, cfg)
        _refuse_optimizer_layout(bundle, latest, cfg)
        return RestorePlan("resume", latest, tuple(decision.honoured), decision.old,
                           tuple(decision.data_changed), bundle)
    if not ckpt.init_from:
        return RestorePlan("fresh")
    source = resolve_checkpoint(ckpt.init_from)
    if source.resolve().is_relative_to(Path(cfg.output_dir).resolve()):
        raise ConfigError(f"checkpoint.init_from: {source} lies inside this run's output_dir "
                          f"(it would be resumed, not initialised from); use checkpoint.resume")
    bundle = read_checkpoint_state(source)
    if ckpt.init_optimizer and not bundle.get("has_optimizer", True):
        raise ConfigError(f"checkpoint.init_optimizer: {source} has no optimizer state (it was "
                          f"saved before the first step); load weights only")
    check_init_vocab(source, cfg, vocab_size)
    if ckpt.init_optimizer:
        _refuse_optimizer_layout(bundle, source, cfg)
    return RestorePlan("init_from", source, honoured=tuple(rope_changes(source, cfg)),
                       bundle=bundle)


def _refuse_optimizer_layout(bundle: dict, path: Path, cfg: RunConfig) -> None:
    """Refuse, before a model is built, to load a dp_reshardable optimizer state at other
    parallel degrees (the buckets are compared once the optimizer exists)."""
    problem = layout_problem(bundle, path, cfg.parallel)
    if problem is not None:
        raise CheckpointError(problem)


def _vocab_of(cfg: RunConfig) -> Optional[int]:
    """The vocabulary a run's model is built for; None when its tokenizer is unreadable."""
    from phoenix.tokenizer import model_vocab_size

    try:
        return model_vocab_size(cfg)
    except (OSError, ValueError, RuntimeError):
        return None


def check_init_vocab(source: Path, cfg: RunConfig, vocab_size: Optional[int] = None) -> None:
    """Refuse ``checkpoint.init_from`` of a checkpoint built for another vocabulary size.

    Embedding and output rows are indexed by token id, and padding to a multiple of 128
    can give two vocabularies the same shape: a shape check alone would load a
    checkpoint of the old vocabulary into the new one with zero rows for the new tokens.
    A vocabulary is grown offline instead (``phoenix expand-vocab --checkpoint``, whose
    output has the new size and initialised rows); init_from then loads it like any
    checkpoint. Unknown sizes (an unreadable tokenizer of the source) are not checked."""
    from phoenix.config.loader import load_saved_config

    try:
        saved = load_saved_config(source / "config.yaml")
    except (OSError, ValueError):
        return
    theirs, mine = _vocab_of(saved), vocab_size if vocab_size is not None else _vocab_of(cfg)
    if theirs is None or mine is None or theirs == mine:
        return
    hint = (f"grow it with phoenix expand-vocab OLD_TOKENIZER --tokenizer "
            f"{cfg.tokenizer.path} --checkpoint {source} --out OUT, then init_from OUT"
            if mine > theirs else "a vocabulary cannot shrink")
    raise ConfigError(f"checkpoint.init_from: {source} was trained with a vocabulary of {theirs} "
                      f"tokens, this run's model has {mine} ({cfg.tokenizer.path}); its embedding "
                      f"rows belong to the other tokenizer: {hint}")


def upgrade_bundle(bundle: dict, path: Path, cfg: RunConfig) -> dict:
    """The bundle of checkpoint ``path`` in the current format (see the module docstring).

    Raises CheckpointError naming the format version when it cannot be converted."""
    version = bundle.get("format", 1)
    if version == FORMAT_VERSION:
        return bundle
    if version == 2:
        return _upgrade_v2(bundle)
    if version != 1:
        raise CheckpointError(f"checkpoint {path} has format version {version}; this phoenix "
                              f"reads versions 1 to {FORMAT_VERSION} (a newer phoenix wrote it)")
    if "trainer" not in bundle:
        raise CheckpointError(f"checkpoint {path} (format version 1) has no trainer state; it "
                              f"cannot be resumed, only used as checkpoint.init_from")
    states = {"trainer": bundle["trainer"]}
    if "scheduler" in bundle:
        states["scheduler"] = _upgrade_v1_scheduler(bundle["scheduler"], path, cfg)
    for name, state in (bundle.get("callbacks") or {}).items():
        if name in _V1_CALLBACK_KEYS:
            states[_V1_CALLBACK_KEYS[name]] = state
        else:
            log.warning("checkpoint %s (format version 1): state of callback %s is not read",
                        path, name)
    return _upgrade_v2({"format": 2, "step": int(bundle["trainer"]["step"]),
                        "world_size": bundle.get("world_size"),
                        "has_optimizer": bundle.get("has_optimizer", True), "states": states})


def _upgrade_v2(bundle: dict) -> dict:
    """Format 2 kept the data layer's resume state inside the trainer's; format 3 gives it
    its own key, ``"data"`` (phoenix.data.data_resume.DataState)."""
    states = dict(bundle["states"])
    trainer = dict(states.get("trainer", {}))
    states["data"] = {"data_resume": trainer.pop("data_resume", None)}
    states["trainer"] = trainer
    return {**bundle, "format": FORMAT_VERSION, "states": states}


def _upgrade_v1_scheduler(state: dict, path: Path, cfg: RunConfig) -> dict:
    """Format 1 runs without LR phases saved megatron's OptimizerParamScheduler state.
    The run's scheduler reproduces it step for step when the settings are the same."""
    if "schedule_fingerprint" in state:
        return state
    o, resolved = cfg.optim, cfg.resolved
    decay_steps = max(o.decay_steps or cfg.train.steps, o.warmup_steps + 1)
    expected = {"max_lr": o.lr, "min_lr": o.min_lr, "lr_warmup_steps": o.warmup_steps,
                "lr_decay_steps": decay_steps, "lr_decay_style": o.decay_style}
    changed = {k: (state.get(k), v) for k, v in expected.items() if state.get(k) != v}
    if resolved.explicit_schedule or changed:
        what = ", ".join(f"{k} {a} -> {b}" for k, (a, b) in changed.items()) or \
            "the config now gives LR phases"
        raise CheckpointError(
            f"checkpoint {path} has format version 1 with megatron's LR scheduler state, and "
            f"the config's schedule differs from it ({what}); resume with the same optim "
            f"settings, or start from it with checkpoint.init_from")
    return {"num_steps": int(state.get("num_steps", state.get("num_iters", 0))),
            "schedule_fingerprint": resolved.schedule.fingerprint(), "phases": []}


class Checkpointer:
    """Owns ``<output_dir>/checkpoints``; every rank calls every method (they are collective).

    ``stateful`` maps a stable key to each object whose ``state_dict`` goes into the
    bundle; they are restored in that order (the trainer's state first, so its checks
    give the clearest message)."""

    def __init__(self, cfg: RunConfig, layout, config_yaml: str, model, optimizer,
                 stateful: dict[str, Stateful]):
        self.cfg, self.ckpt = cfg, cfg.checkpoint
        self.layout = layout
        self.config_yaml = config_yaml
        self.model, self.optimizer = model, optimizer
        self.stateful = stateful
        self.store = CheckpointStore(checkpoint_root(cfg.output_dir), layout.rank,
                                         layout.world_size, self.ckpt.keep_last)
        self.published: list[Path] = []  # background saves published, not yet reported

    # -- restore -------------------------------------------------------------------
    def restore(self, plan: RestorePlan) -> str:
        """Load what ``plan`` says into the model, optimizer and stateful objects; returns
        a one-line description for the log."""
        if plan.kind == "resume":
            self.store.check_compatible(plan.path, self.model)
            bundle = plan.bundle  # read and upgraded once, by plan_restore
            self._check_optimizer_layout(plan)
            with self._keeping_group_settings():
                self.store.load(plan.path, self.model, self.optimizer, bundle)
            for key, obj in self.stateful.items():
                if key in bundle["states"]:
                    obj.load_state_dict(bundle["states"][key])
                elif key in ("trainer", "scheduler"):
                    raise CheckpointError(f"checkpoint {plan.path} has no '{key}' state")
            if plan.honoured:
                if self.layout.rank == 0:
                    record_changes(self.cfg.output_dir, bundle["step"], list(plan.honoured))
                log.warning("resume: honouring config changes from step %s on: %s", bundle["step"],
                            "; ".join(map(str, plan.honoured)))
            return f"resumed from {plan.path} at step {bundle['step']}"
        if plan.kind == "init_from":
            self.store.check_compatible(plan.path, self.model)
            if self.ckpt.init_optimizer:
                self._check_optimizer_layout(plan)
                with self._keeping_group_settings():
                    self.store.load(plan.path, self.model, self.optimizer, plan.bundle,
                                      load_rng=False)
                what = "weights and optimizer state"
            else:
                self.store.load_weights(plan.path, self.model)
                what = "weights (the optimizer starts fresh)"
            if plan.honoured:
                if self.layout.rank == 0:
                    record_changes(self.cfg.output_dir, 0, list(plan.honoured))
                log.warning("init_from: the RoPE differs from the one %s was trained with: %s",
                            plan.path, "; ".join(map(str, plan.honoured)))
            return f"initialised {what} from {plan.path}; schedule and data start at step 0"
        return "starting from scratch"

    def _check_optimizer_layout(self, plan: RestorePlan) -> None:
        """A dp_reshardable checkpoint's optimizer state loads only at its own layout and
        buckets: refused in one line naming ``phoenix reshard`` otherwise (rank 0's buckets
        decide; the degrees are the same on every rank)."""
        from phoenix.runtime.distributed import max_over_ranks

        problem = layout_problem(plan.bundle, plan.path, self.cfg.parallel,
                                 self.optimizer if self.layout.rank == 0 else None)
        if max_over_ranks(problem is not None):
            raise CheckpointError(problem or layout_problem(plan.bundle, plan.path, self.cfg.parallel)
                                  or f"checkpoint {plan.path}: its optimizer state does not fit "
                                     f"this layout (see rank 0)")

    @contextlib.contextmanager
    def _keeping_group_settings(self):
        """Loading an optimizer replaces its param groups' settings (max_lr, min_lr, betas,
        eps, weight decay, lr_mult, ...) with the checkpoint's; this run's config decides
        them, only the Adam state (moments, step counts) is taken over. The scheduler then
        sets the LR and weight decay of the restored step."""
        settings = [{k: v for k, v in g.items() if k != "params"}
                    for g in self.optimizer.param_groups]
        yield
        for group, mine in zip(self.optimizer.param_groups, settings):
            group.update(mine)

    # -- save ----------------------------------------------------------------------
    def save(self, step: int, *, last: bool = False) -> Optional[Path]:
        """Save after ``step`` steps if the cadence asks for it: every
        ``checkpoint.save_interval`` steps, and with ``last`` (the end of the job) when
        ``save_at_end``; a step already saved is not saved again. Returns the path, or None
        (nothing due, or a periodic save left to write in the background with
        ``checkpoint.async_save``: :meth:`poll` publishes it).

        A failed save raises CheckpointSaveError, except a periodic one under
        ``checkpoint.on_save_error: continue`` (logged; None is returned)."""
        every = self.ckpt.save_interval
        due = bool(every) and step % every == 0
        if last:
            due = (due or self.ckpt.save_at_end) and self.latest_step() != step
        if not due:
            return None
        try:
            return self.save_now(step, background=self.ckpt.async_save and not last)
        except CheckpointSaveError as e:
            if last:
                raise
            self._periodic_failed(e)
            return None

    def _periodic_failed(self, e: CheckpointSaveError) -> None:
        """checkpoint.on_save_error for a failed periodic save: re-raise, or log and go on."""
        if self.ckpt.on_save_error == "stop":
            raise e
        if self.layout.rank == 0:
            every, step = self.ckpt.save_interval, e.step
            end = min(self.cfg.train.steps, self.cfg.train.stop_at_step or self.cfg.train.steps)
            nxt = f"step {step + every}" if step + every < end else "the end of the job"
            log.error("%s; training continues (checkpoint.on_save_error: continue) and "
                      "saves again at %s", e, nxt)

    def save_now(self, step: int, *, background: bool = False) -> Optional[Path]:
        """Write checkpoint ``step`` now (atomically; see phoenix.checkpoint.store), after
        finishing a background save still in progress. ``background``: megatron's
        asynchronous save (returns None; :meth:`poll` / :meth:`wait` publish it)."""
        self.wait()
        # Before the first step Adam has no state to save: a step-0 checkpoint is weights only.
        optimizer = self.optimizer if step > 0 else None
        bundle = {"format": FORMAT_VERSION, "step": step,
                  "states": {key: obj.state_dict() for key, obj in self.stateful.items()}}
        fmt = self.ckpt.optimizer_format
        with gathered_params(self.model):  # overlap_param_gather: the updated weights
            return self.store.save(step, self.model, optimizer, bundle, self.config_yaml,
                                   optimizer_format=fmt, background=background,
                                   layout=layout_record(self.cfg.parallel, self.optimizer))

    def poll(self) -> None:
        """Publish a background save whose writers are done on every rank (one all-reduce
        while one is in progress, but in the steps its writers are not expected to be done:
        CheckpointStore.finish_pending; never waits). Collective: every step."""
        self._finish_pending(block=False)

    def wait(self) -> None:
        """Publish the background save in progress, waiting for its writers."""
        self._finish_pending(block=True)

    def _finish_pending(self, block: bool) -> None:
        try:
            path = self.store.finish_pending(block)
        except CheckpointSaveError as e:
            self._periodic_failed(e)
            return
        if path is not None:
            self.published.append(path)

    def take_published(self) -> list[Path]:
        """The background saves published since the last call (for the saved callbacks)."""
        out, self.published = self.published, []
        return out

    def close(self, clean: bool) -> None:
        """The end of the job: publish the background save in progress when ``clean``
        (every rank ends here together), else stop its writer unpublished (a failing job:
        the previous checkpoint stays latest)."""
        if clean:
            self.wait()
        else:
            self.store.abandon_pending()

    # -- queries -------------------------------------------------------------------
    def latest(self) -> Optional[Path]:
        """This run's newest complete checkpoint."""
        return self.store.latest()

    def latest_step(self) -> Optional[int]:
        latest = self.latest()
        return step_of(latest) if latest is not None else None
