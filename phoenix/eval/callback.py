"""Held-out evaluation during training, as a trainer callback.

Every ``eval.interval`` optimizer steps, and after the last step of the job when
``eval.at_end`` (before the final checkpoint is saved, so ``phoenix eval`` on that
checkpoint reproduces the numbers), every eval set is evaluated
(:class:`phoenix.eval.Evaluator`) and logged:

Samples are cut at the sequence length of the stage the step trained in (a
context-extension stage evaluates at its own length; the loss moves at the boundary).

* The step's metrics (on the logging rank; the TensorBoard sink writes them):
  ``eval/<set>/loss``, ``eval/<set>/ppl``, ``eval/<set>/top1``, ``eval/<set>/top5`` at
  the training step (steps completed, as ``1_train/loss``), and ``time/eval`` (seconds).
* The console (logging rank): one line per set.
* With ``eval.needle``, the needle-in-a-haystack eval (:mod:`phoenix.eval.needle`) at the
  same steps: ``eval/needle/<length>`` (accuracy over depths and trials) and
  ``eval/needle/mean`` scalars, the image ``eval/needle/heatmap`` (accuracy, depth x
  length) and the same heatmap as ``<output_dir>/needle/step_XXXXXXX.png``; the lengths
  default to powers of two up to the sequence length of the stage the step trained in.
  Its time is part of ``time/eval``.

All ranks must have the callback (evaluation is collective). It is passive: training
numbers are bit-identical with and without it.
"""

from __future__ import annotations

import logging

from phoenix.config.eval import EvalConfig
from phoenix.eval.evaluator import EvalResult, Evaluator
from phoenix.eval.needle import NeedleResult, format_needle_table
from phoenix.model.param_sync import gathered_params
from phoenix.monitor.base import Callback, StepMetrics, is_logging_step

log = logging.getLogger("phoenix.eval")


class EvalCallback(Callback):
    # After the training monitors: the step's progress, norm and spike output come first,
    # then the (slow) evaluation of the updated weights.
    priority = 100
    state_key = "eval"

    def __init__(self, eval_cfg: EvalConfig):
        self.cfg = eval_cfg
        self.evaluators: dict[int, Evaluator] = {}
        """One evaluator per sequence length: sets are cut at the current stage's length."""
        self._make_evaluator = None
        self.needle = None
        self.history: list[tuple[int, dict[str, EvalResult]]] = []
        """(step, results by set name) of every evaluation this process ran."""
        self.needle_history: list[tuple[int, NeedleResult]] = []
        """(step, result) of every needle evaluation this process ran."""

    def on_train_start(self, trainer) -> None:
        inputs = trainer.inputs  # the run's tokenizer and vocabulary, resolved once
        tokenizer = inputs.tokenizer

        def make_evaluator(seq_length: int) -> Evaluator:
            return Evaluator.from_run_config(trainer.model, trainer.layout, trainer.cfg, self.cfg,
                                             tokenizer, seq_length=seq_length)

        self._make_evaluator = make_evaluator
        if self.cfg.needle is not None:
            from phoenix.eval.needle_run import NeedleEvaluator

            cfg = trainer.cfg
            self.needle = NeedleEvaluator(
                trainer.model, trainer.layout, self.cfg.needle, tokenizer,
                vocab_size=inputs.vocab_size,
                micro_batch_size=self.cfg.micro_batch_size or cfg.train.micro_batch_size)
            for stage in trainer.stages.stages:  # prompt errors (a length too short) now
                self.needle.tasks(stage.seq_length)

    def _due(self, trainer, step: int) -> bool:
        # at_end: the last step of this job (a run may stop early, to be resumed).
        return (is_logging_step(step, self.cfg.interval)
                or (self.cfg.at_end and step == trainer.inputs.last_step))

    def on_step_end(self, trainer, m: StepMetrics) -> None:
        if self._make_evaluator is None or not self._due(trainer, m.step):
            return
        # The stage of the step just trained (m.step steps completed: 0-based m.step - 1).
        seq_length = trainer.stages.stage_at(m.step - 1).seq_length
        if seq_length not in self.evaluators:
            self.evaluators[seq_length] = self._make_evaluator(seq_length)
        needle = None
        with gathered_params(trainer.model):  # overlap_param_gather: the updated weights
            results, seconds = self.evaluators[seq_length].evaluate_timed()
            if self.needle is not None:
                needle, needle_seconds = self.needle.evaluate_timed(seq_length)
                seconds += needle_seconds
        self.history.append((m.step, results))
        if needle is not None:
            self.needle_history.append((m.step, needle))
        if not trainer.layout.is_logging_rank:
            return
        for name, r in results.items():
            log.info(f"eval {name} @ step {m.step}: loss {r.loss:.4f} | ppl {r.ppl:.3f} | "
                     f"top1 {r.top1:.4f} | top5 {r.top5:.4f} | {r.tokens} tokens")
        if needle is not None:
            self._log_needle(trainer, m.step, needle)
        log.info(f"eval @ step {m.step}: {seconds:.1f}s")
        for name, r in results.items():
            for key, value in r.scalars().items():
                trainer.metrics.record(f"eval/{name}/{key}", value)
        trainer.metrics.record("time/eval", seconds)

    def _log_needle(self, trainer, step: int, result: NeedleResult) -> None:
        from phoenix.config.eval import NEEDLE_TAG
        from phoenix.eval.needle_run import heatmap_path, write_heatmap

        log.info(f"eval needle @ step {step}:\n{format_needle_table(result)}")
        for key, value in result.scalars().items():
            trainer.metrics.record(f"eval/{NEEDLE_TAG}/{key}", value)
        image = write_heatmap(result, heatmap_path(trainer.out_dir, step),
                              f"needle accuracy @ step {step} (mean {result.mean:.3f})")
        if image is not None:
            trainer.metrics.record_image(f"eval/{NEEDLE_TAG}/heatmap", image)

    @property
    def last(self) -> dict[str, EvalResult] | None:
        return self.history[-1][1] if self.history else None
