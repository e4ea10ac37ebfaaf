"""The training loop, top to bottom: set-up, resume, steps, checkpoints.

Everything a run needs is built in :meth:`Trainer.setup` from the typed config and the
:class:`ParallelLayout`; :meth:`Trainer.train` is the loop. Logging and monitoring are
callbacks and only read what the step produced, so they cannot change the numbers.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist

from phoenix.checkpoint import Checkpointer, plan_restore, sweep_unfinished_saves
from phoenix.config import RunConfig, dump_config
from phoenix.data.documents import DocumentInputs
from phoenix.data.loader import GlobalBatchLoader
from phoenix.data.data_resume import DataResume, DataState, extend_history, rebase
from phoenix.data.plan_cache import build_source
from phoenix.io import atomic_write_text
from phoenix.model import build_model, chunk_iterators, current_rope, install_rope, unwrap
from phoenix.model.builder import uses_te_spec
from phoenix.monitor.base import Callback, MetricsCollector, StepMetrics, sort_callbacks
from phoenix.optim import build_optimizer, build_scheduler
from phoenix.optim.param_groups import frozen_model_params, zero_frozen_grads
from phoenix.optim.nonfinite import local_grads_finite
from phoenix.runtime import ParallelLayout, any_rank, claim_run_dir, on_every_rank
from phoenix.runtime.device_tracking import mark_host
from phoenix.runtime.preemption import StopRequest
from phoenix.train.callbacks import run_callbacks
from phoenix.train.inputs import RunInputs, check_inputs
from phoenix.train.skip_batches import BatchSkipper
from phoenix.train.step import batch_report, forward_step, reduce_loss

log = logging.getLogger("phoenix.train")


class NonFiniteLossError(RuntimeError):
    """The loss or the gradients became NaN/Inf (``on_nonfinite_loss: stop``); nothing was
    applied or saved, and the last good checkpoint is left untouched."""


@dataclass
class TrainState:
    """The trainer's own resumable state (model/optimizer live in the checkpoint)."""

    step: int = 0
    consumed_samples: int = 0
    consumed_tokens: int = 0
    skipped_steps: int = 0
    stage_starts: dict[str, int] = field(default_factory=dict)
    """Step at which each stage that has begun began (by stage name)."""


class Trainer:
    """One rank's training run: :meth:`setup` builds everything from the config, then
    :meth:`train` runs the loop.

    ``cfg`` is the resolved run config, ``layout`` this process's place in the parallel
    layout (from :func:`phoenix.runtime.init_runtime`). ``callbacks`` replaces the
    default side concerns (console, TensorBoard, norms, per-dataset loss, throughput,
    spikes, eval), e.g. in tests. Every method is collective: all ranks call it.
    """

    def __init__(self, cfg: RunConfig, layout: ParallelLayout, callbacks: list[Callback] | None = None):
        self.cfg, self.layout = cfg, layout
        self.out_dir = Path(cfg.output_dir)
        self.config_yaml = dump_config(cfg)
        self.stages = cfg.resolved.stages
        self.state = TrainState()
        self.run_lock = None  # rank 0's lock on out_dir while setup/train run
        self.loss: float = float("nan")
        """Global loss of the step in progress (set before on_before_optimizer_step)."""
        self.skip_reason: str | None = None
        self.batch_report: dict = {}
        """This rank's per-sample losses and provenance of the latest step (last stage only;
        see phoenix.train.step.batch_report): what per-dataset loss and spike logs read."""
        self.losses: list[tuple[int, float]] = []
        """(step, loss) of the steps this process ran: for tests and the run summary."""
        self.metrics = MetricsCollector(self.state.step, cfg.train.steps, cfg.logging.log_interval)
        """What the callbacks record during the step in progress (a fresh one every step;
        see phoenix.monitor.base); handed to the sinks once the step's callbacks have run."""
        # Callbacks run in descending ``priority`` (sort_callbacks; again at train start, as
        # callers may add some). The order that matters, as the priorities state it:
        # ConsoleLogger (1000) first, so a step's progress line precedes its spike/eval
        # lines; the producers TrainScalars (900), NormMonitor (600), DatasetLossMonitor
        # (500), MoEMonitor (450, with model.moe), ThroughputMonitor (400); SpikeMonitor
        # (300) after NormMonitor, because a spike record lists the per-layer grad norms
        # NormMonitor recorded that step; EvalCallback (100) after the monitors of the training step; callbacks added by
        # callers default to 0; the TensorBoardLogger sink (-1000) last, so it closes its
        # writer after everything else at train end. Sinks write in log_metrics, after
        # every callback's on_step_end, so no producer has to come before a sink.
        self.callbacks = sort_callbacks(
            callbacks if callbacks is not None
            else list(run_callbacks(cfg, self.out_dir, self.config_yaml).values()))

    # -- set-up ----------------------------------------------------------------------
    def setup(self) -> None:
        """Check the inputs, decide resume / init_from / fresh, build the data source,
        model, optimizer, scheduler and loader, and restore the checkpoint. Raises
        ConfigError, DataError or CheckpointError (naming the key or file) before any
        model is built when the inputs are wrong."""
        cfg, layout = self.cfg, self.layout
        self.inputs: RunInputs = on_every_rank(check_inputs, cfg)  # fails on every rank, or none
        tokenizer = self.inputs.tokenizer
        if layout.rank == 0:  # before any write: a dead job's unfinished save may fill the disk
            for name, size in sweep_unfinished_saves(self.out_dir):
                log.info("removed %s (%d bytes), the unfinished save of an earlier job", name, size)
        # One job per run directory, which every rank must see: locked before the first write.
        self.run_lock = claim_run_dir(self.out_dir, layout.rank)
        # Resume, init_from or fresh: decided under the lock (a job that just ended may have
        # saved a newer checkpoint), and before any model exists.
        self.restore_plan = on_every_rank(plan_restore, cfg, vocab_size=self.inputs.vocab_size)
        vocab_size = self.inputs.vocab_size
        if layout.rank == 0:
            atomic_write_text(self.out_dir / "config.yaml", self.config_yaml)
            log.info("run '%s': %s -> %s", cfg.name, layout.describe(), self.out_dir)
        dist.barrier()

        # The data plan first: its input errors must stop the run before a model is built.
        plan = self.restore_plan
        saved = (plan.bundle or {}).get("states", {}).get("data") if plan.kind == "resume" else None
        recut = saved is None or "stream_recut" in saved  # else: planned before exact re-cuts
        source, data_resume = build_source(
            cfg, layout.rank, tokenizer, resume=DataResume.from_dict(plan.data_resume),
            changed_from=(plan.old_config, plan.start_step) if plan.data_changed else None,
            recut=recut)
        if plan.data_changed and layout.rank == 0:
            log.warning("resume: the data changes from step %s on (an implicit stage boundary: "
                        "every dataset's stream continues where it stood; one read at a new "
                        "seq_length first reads the rest of its current epoch, re-cut at that "
                        "length, so no token of the epoch is read twice or skipped): %s",
                        plan.start_step, "; ".join(plan.data_changed))
        self.stages = rebase(cfg.resolved.stages, data_resume)
        # Built with the RoPE of the step it starts from (a stage's own rope included).
        self.model = build_model(cfg, layout, vocab_size,
                                 rope=self.stages.stage_at(plan.start_step).rope)
        o = cfg.optim
        self.optimizer = build_optimizer(cfg, self.model, layout, param_rules=o.param_groups,
                                         freeze=o.freeze)
        self.scheduler = build_scheduler(cfg, self.optimizer)
        self.frozen = frozen_model_params(self.model, o.freeze)
        self._wire_megatron_hooks()

        # The data position is a pure function of the step: the checkpoint holds the
        # trainer's step, not a second copy of it in the loader.
        self.skipper = BatchSkipper(cfg.train.skip_batches, self.out_dir,
                                    [e.display_name for e in cfg.data.datasets],
                                    layout.is_logging_rank)
        self.loader = GlobalBatchLoader(source, self.stages, cfg.train.micro_batch_size,
                                 layout.dp_rank, layout.dp_size, cfg.train.steps,
                                 prefetch=cfg.data.prefetch_batches,
                                 transform=DocumentInputs.from_config(cfg.data, self.inputs.eod_id),
                                 skip_steps=self.skipper.loader_steps())
        self.cp_group = layout.cp_group if cfg.parallel.context > 1 else None
        self.forward_step = partial(forward_step, packed=uses_te_spec(layout),
                                    cp_group=self.cp_group)
        # The data layer's own state (its latest implicit stage boundary and the earlier
        # ones, which inspect-batch replays), under "data".
        history = (saved or {}).get("history", [])
        if plan.data_changed:  # the config trained before this boundary joins the history
            history = extend_history(saved, plan.start_step, (plan.path / "config.yaml").read_text())
        stateful = {"trainer": self, "scheduler": self.scheduler,
                    "data": DataState(data_resume, history, recut)}
        for cb in self.callbacks:
            key = getattr(cb, "state_key", None)
            if key is not None and hasattr(cb, "state_dict"):
                if key in stateful:
                    raise ValueError(f"two stateful objects use the checkpoint key '{key}'")
                stateful[key] = cb
        self.checkpointer = Checkpointer(cfg, layout, self.config_yaml, self.model,
                                         self.optimizer, stateful)
        self._log0(self.checkpointer.restore(self.restore_plan))
        self.loader.load_state_dict({"step": self.state.step})

    def _wire_megatron_hooks(self) -> None:
        """Give megatron's schedule the DDP hooks of every model chunk: one callable with a
        single chunk, a list (one per chunk, in chunk order) with a virtual pipeline, as
        the interleaved schedule calls ``grad_sync_func[c]`` / ``param_sync_func[c]`` as
        chunk ``c`` finishes its backward / is about to start its forward."""
        from megatron.core.distributed import finalize_model_grads

        def per_chunk(name):
            funcs = [getattr(chunk, name) for chunk in self.model]
            return funcs[0] if len(funcs) == 1 else funcs

        config = self.model[0].config  # one TransformerConfig, shared by every chunk
        config.finalize_model_grads_func = finalize_model_grads
        config.grad_scale_func = self.optimizer.scale_loss
        config.no_sync_func = per_chunk("no_sync")
        ddp = self.model[0].ddp_config
        if ddp.overlap_grad_reduce:  # the last micro-batch's backward starts each chunk's reduce
            config.grad_sync_func = per_chunk("start_grad_sync")
        if ddp.overlap_param_gather and ddp.align_param_gather:  # the schedule starts the gathers
            config.param_sync_func = per_chunk("start_param_sync")

    @property
    def gpt_models(self) -> list:
        """The GPTModel of each model chunk, wrappers (DDP, Float16Module) removed: what
        callbacks read parameters and sizes from (monitor/ does not import model/)."""
        return [unwrap(chunk) for chunk in self.model]

    # -- the trainer's own checkpoint state ------------------------------------------
    def state_dict(self) -> dict:
        return asdict(self.state)

    def load_state_dict(self, state: dict) -> None:
        self.state = TrainState(**state)

    def _enter_stage(self, step: int):
        """The stage of 0-based ``step``; records and announces it when it begins."""
        stage = self.stages.stage_at(step)
        self._switch_rope(stage)
        if stage.name not in self.state.stage_starts:
            self.state.stage_starts[stage.name] = step
            if self.stages.explicit:
                self._log0(f"stage {stage.index + 1}/{len(self.stages)} '{stage.name}' begins at "
                           f"step {step}: global batch {stage.global_batch_size} x seq "
                           f"{stage.seq_length}, {stage.steps} steps")
            return stage, True
        return stage, False

    def _switch_rope(self, stage) -> None:
        """Give the model the stage's RoPE when it differs from the one it has (a context-
        extension stage begins; the model is built with the RoPE of its start step)."""
        if stage.rope is None:
            return
        old = [current_rope(chunk) for chunk in self.model]
        if all(rope == stage.rope for rope in old):
            return
        for chunk, rope in zip(self.model, old):
            if rope != stage.rope:
                install_rope(chunk, stage.rope)
        before = old[0].describe() if old[0] is not None else "none"
        self._log0(f"stage '{stage.name}': RoPE {before} -> {stage.rope.describe()}")

    # -- the loop --------------------------------------------------------------------
    def train(self) -> TrainState:
        """Run optimizer steps until ``train.steps`` (or ``train.stop_at_step``), saving
        checkpoints on the configured cadence; returns the final state. Raises
        NonFiniteLossError on a NaN/Inf loss with ``on_nonfinite_loss: stop``."""
        from megatron.core.pipeline_parallel import get_forward_backward_func

        cfg, state = self.cfg, self.state
        self._forward_backward = get_forward_backward_func()
        self.callbacks = sort_callbacks(self.callbacks)
        for cb in self.callbacks:
            cb.on_train_start(self)
        self.skipper.start()
        if cfg.checkpoint.save_initial and state.step == 0:
            self._after_save(self.checkpointer.save_now(0))
        last_step = self.inputs.last_step
        t_callbacks = 0.0  # time the callbacks of the previous step took (logging cost)
        stop = StopRequest(cfg.train.time_limit_minutes).install()
        try:
            while state.step < last_step:
                if self.skipper.skips(state.step + 1):  # train.skip_batches: no callbacks
                    self._skip_step(self._enter_stage(state.step)[0])
                else:
                    metrics = self._train_step(*self._enter_stage(state.step))
                    metrics.callbacks_time_prev_step = t_callbacks
                    t2 = self._clock()
                    for cb in self.callbacks:
                        cb.on_step_end(self, metrics)
                    for cb in self.callbacks:  # the sinks write what was recorded this step
                        cb.log_metrics(self, self.metrics)
                    t_callbacks = self._clock() - t2
                self.checkpointer.poll()  # publishes a background save its writers finished
                saved = self.checkpointer.save(state.step, last=state.step == last_step)
                # a background save this one waited for was published first: announced first
                self._after_background_saves()
                self._after_save(saved)
                reason = stop.agreed() if state.step < last_step else None
                if reason is not None:  # preemption or time limit: save and end the job cleanly
                    self.checkpointer.wait()  # a background save of this step counts
                    self._after_background_saves()
                    if self.checkpointer.latest_step() != state.step:
                        self._after_save(self.checkpointer.save_now(state.step))
                    self._log0(f"stopping after step {state.step}: {reason}; checkpoint "
                               f"{self.checkpointer.latest()} resumes the run")
                    break
            if state.skipped_steps:
                log.warning("%d of the run's %d steps so far were skipped (not applied): see "
                            "1_train/skipped_steps and the step lines", state.skipped_steps,
                            state.step)
        except BaseException as e:
            # An agreed stop (every rank raises it at the same step) may still publish the
            # background save in progress; anything else may have left ranks apart, so the
            # writer is stopped unpublished (the previous checkpoint stays latest).
            self.checkpointer.close(clean=isinstance(e, NonFiniteLossError))
            raise
        else:
            self.checkpointer.close(clean=True)
            self._after_background_saves()
        finally:
            stop.uninstall()
            self.loader.close()
            for cb in self.callbacks:
                cb.on_train_end(self)
            if self.run_lock is not None:
                self.run_lock.release()
        return state

    def _train_step(self, stage, stage_began: bool) -> StepMetrics:
        """One optimizer step of ``stage``: the global batch, forward-backward, the
        non-finite check, the update (or an agreed skip) and the LR schedule; advances
        ``self.state`` and returns what the step produced (before its callbacks' time)."""
        cfg, state = self.cfg, self.state
        self.metrics = MetricsCollector(state.step + 1, cfg.train.steps, cfg.logging.log_interval)
        t0 = self._clock()
        micro_batches = mark_host(self.loader.next_batch())  # strict mode: host data
        t_data = self._clock() - t0

        for chunk in self.model:
            chunk.zero_grad_buffer()
        self.optimizer.zero_grad()
        losses = self._forward_backward(
            forward_step_func=self.forward_step, data_iterator=chunk_iterators(micro_batches,
                                                                               len(self.model)),
            model=self.model, num_microbatches=len(micro_batches),
            seq_length=stage.seq_length, micro_batch_size=cfg.train.micro_batch_size,
            forward_only=False)
        # Frozen parameters: no update and no share of the grad norm / clipping (zeroed
        # before the checks and callbacks, so they see what is applied).
        zero_frozen_grads(self.frozen, state.step, cfg.optim.freeze)
        # A non-finite loss or gradient must never reach the weights: the loss and every
        # rank's gradient verdict come in one collective and one host copy.
        loss, tokens, grads_finite = self._step_report(losses)
        self.batch_report = batch_report(losses, self.cp_group)
        t_fwd_bwd = self._clock() - t0 - t_data

        lr = self.scheduler.base_lr()  # the schedule's LR of this step (before lr_mult / freeze)
        self.loss, self.skip_reason = loss, None
        nonfinite = (f"non-finite loss ({loss})" if not math.isfinite(loss)
                     else None if grads_finite else "non-finite gradients")
        if nonfinite is not None:
            if cfg.train.on_nonfinite_loss == "stop":
                raise NonFiniteLossError(
                    f"{nonfinite} at step {state.step + 1}; stopping without applying or "
                    f"saving it (last good checkpoint: {self.checkpointer.latest()})")
            self.skip_reason = nonfinite
        else:
            for cb in self.callbacks:  # may call request_skip()
                cb.on_before_optimizer_step(self)
        t1 = self._clock()
        if self._agree_on_skip():
            grad_norm = float("nan")
            state.skipped_steps += 1
        else:
            _, grad_norm, _ = self.optimizer.step()
            for cb in self.callbacks:
                cb.on_after_optimizer_step(self, grad_norm)
        self.scheduler.step(increment=1)
        t_optimizer = self._clock() - t1

        state.step += 1
        state.consumed_samples += stage.global_batch_size
        state.consumed_tokens += tokens
        self.losses.append((state.step, loss))
        return StepMetrics(
            step=state.step, loss=loss, lr=lr,
            grad_norm=float(grad_norm) if grad_norm is not None else float("nan"),
            tokens=tokens, consumed_samples=state.consumed_samples,
            consumed_tokens=state.consumed_tokens, step_time=self._clock() - t0,
            data_time=t_data, forward_backward_time=t_fwd_bwd, optimizer_time=t_optimizer,
            skipped=self.skip_reason is not None, skip_reason=self.skip_reason,
            loss_scale=self._loss_scale(), stage=stage, stage_began=stage_began)

    def _skip_step(self, stage) -> None:
        """A step of ``train.skip_batches`` (phoenix.train.skip_batches): its global batch's
        place in the plan is consumed (its tokens unread), the step and the LR schedule
        advance, nothing else runs; the logging rank records the batch's provenance."""
        if self.loader.next_batch() is not None:  # the loader skips the same steps
            raise RuntimeError(f"step {self.state.step + 1}: the loader read a skipped batch (bug)")
        self.skipper.skip(self.state.step + 1, stage, self.loader.source,
                          self.loader.batches.batch_start(self.state.step))
        self.scheduler.step(increment=1)
        self.state.step += 1
        self.state.consumed_samples += stage.global_batch_size

    def request_skip(self, reason: str) -> None:
        """Called by a callback in ``on_before_optimizer_step``: do not apply this step's
        update (the batch is still consumed and the schedule still advances)."""
        self.skip_reason = reason

    def _agree_on_skip(self) -> bool:
        """All ranks skip together if any asks (the decision inputs are global, but a
        rank-local bug must not desynchronise the optimizer step)."""
        skip = any_rank(self.skip_reason is not None)
        if skip and self.skip_reason is None:
            self.skip_reason = "requested by another rank"
        return skip

    def _step_report(self, losses: list[dict]) -> tuple[float, int, bool]:
        """(token-mean loss of the global batch, its loss-bearing tokens, whether every
        rank's gradients are finite), known on every rank: one all-reduce over the world
        and one host copy, whatever the model's size.

        The last global rank (on the last stage; with context parallelism each rank holds
        part of every sequence's loss, completed over DP x CP first) contributes the loss,
        every other rank zeros, so the sum is that rank's loss exactly (a NaN/Inf stays
        one); every rank adds 1 when one of its gradients is not finite."""
        layout = self.layout
        report = torch.zeros(3, dtype=torch.float64, device=layout.device)
        if layout.is_last_stage:
            total = reduce_loss(losses, layout.dp_cp_group)
            if layout.rank == layout.world_size - 1:
                report[:2] = total
        report[2] = (~local_grads_finite(self.model)).double()
        if layout.world_size > 1:
            dist.all_reduce(report)
        loss_sum, tokens, bad_ranks = report.tolist()
        return loss_sum / max(tokens, 1.0), int(tokens), bad_ranks == 0

    def _clock(self) -> float:
        """Wall-clock seconds for the phase timers; with ``logging.sync_timers`` after the
        device has finished the work queued so far."""
        if self.cfg.logging.sync_timers and self.layout.device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter()

    def _loss_scale(self) -> float | None:
        if self.cfg.train.precision != "fp16":
            return None
        return float(self.optimizer.get_loss_scale())

    # -- checkpoints -----------------------------------------------------------------
    def _after_save(self, path: Path | None) -> None:
        if path is None:
            return
        self._log0(f"saved checkpoint {path}")
        for cb in self.callbacks:
            cb.on_checkpoint_saved(self, path)

    def _after_background_saves(self) -> None:
        for path in self.checkpointer.take_published():
            self._after_save(path)

    def _log0(self, msg: str) -> None:
        if self.layout.rank == 0:
            log.info(msg)
