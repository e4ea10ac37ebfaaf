"""Held-out evaluation during training, as a trainer callback.

Every ``eval.interval`` optimizer steps, and after the last step of the job when
``eval.at_end`` (before the final checkpoint is saved, so ``phoenix eval`` on that
checkpoint reproduces the numbers), every eval set is evaluated
(:class:`phoenix.eval.Evaluator`) and logged:

* TensorBoard (through the ``TensorBoardLogger``'s writer, on the logging rank):
  ``eval/<set>/loss``, ``eval/<set>/ppl``, ``eval/<set>/top1``, ``eval/<set>/top5`` at
  the training step (steps completed, as ``train/loss``), and ``time/eval`` (seconds).
* The console (logging rank): one line per set.

All ranks must have the callback (evaluation is collective). It is passive: training
numbers are bit-identical with and without it.
"""

from __future__ import annotations

import logging

from phoenix.config.eval import EvalConfig
from phoenix.eval.evaluator import EvalResult, Evaluator
from phoenix.train.callbacks import Callback, StepMetrics

log = logging.getLogger("phoenix.eval")


class EvalCallback(Callback):
    def __init__(self, eval_cfg: EvalConfig):
        self.cfg = eval_cfg
        self.evaluator: Evaluator | None = None
        self.history: list[tuple[int, dict[str, EvalResult]]] = []
        """(step, results by set name) of every evaluation this process ran."""
        self._warned = False

    def on_train_start(self, trainer) -> None:
        from phoenix.tokenizer import SentencePieceTokenizer

        tokenizer = SentencePieceTokenizer(trainer.cfg.tokenizer.model)
        self.evaluator = Evaluator.from_run_config(trainer.model, trainer.layout, trainer.cfg,
                                                   self.cfg, tokenizer)
        train_prefixes = {d.prefix for d in trainer.cfg.data.datasets}
        if trainer.layout.rank == 0:
            for s in self.cfg.sets:
                if s.prefix in train_prefixes:
                    log.warning("eval set '%s': %s is also a training dataset; it is not held "
                                "out", s.display_name, s.prefix)

    def _due(self, trainer, step: int) -> bool:
        train = trainer.cfg.train
        last_step = min(train.steps, train.stop_at_step or train.steps)
        return bool((self.cfg.interval and step % self.cfg.interval == 0)
                    or (self.cfg.at_end and step == last_step))

    def on_step_end(self, trainer, m: StepMetrics) -> None:
        if self.evaluator is None or not self._due(trainer, m.step):
            return
        results, seconds = self.evaluator.evaluate_timed()
        self.history.append((m.step, results))
        if not trainer.layout.is_logging_rank:
            return
        for name, r in results.items():
            log.info(f"eval {name} @ step {m.step}: loss {r.loss:.4f} | ppl {r.ppl:.3f} | "
                     f"top1 {r.top1:.4f} | top5 {r.top5:.4f} | {r.tokens} tokens")
        log.info(f"eval @ step {m.step}: {seconds:.1f}s")
        writer = self._writer(trainer)
        if writer is None:
            return
        for name, r in results.items():
            for key, value in r.scalars().items():
                writer.add_scalar(f"eval/{name}/{key}", value, m.step)
        writer.add_scalar("time/eval", seconds, m.step)

    @property
    def last(self) -> dict[str, EvalResult] | None:
        return self.history[-1][1] if self.history else None

    def _writer(self, trainer):
        from phoenix.monitor.tensorboard import find_writer

        writer = find_writer(trainer)
        if writer is not None:
            return writer
        if not self._warned and trainer.cfg.logging.tensorboard:
            log.warning("eval: no TensorBoard writer found; eval metrics go to the console only")
        self._warned = True
        return None
