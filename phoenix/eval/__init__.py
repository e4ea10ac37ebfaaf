"""Held-out evaluation: loss, perplexity and top-1/top-5 next-token accuracy per eval set.

* :mod:`phoenix.eval.config`: the ``eval`` config section (:class:`EvalConfig`).
* :mod:`phoenix.eval.metrics`: per-micro-batch statistics from vocab-parallel logits.
* :mod:`phoenix.eval.evaluator`: :class:`Evaluator` (any TP/PP/DP layout).
* :mod:`phoenix.eval.callback`: :class:`EvalCallback` (periodic and end-of-run eval).
* :mod:`phoenix.eval.run`: ``phoenix eval CHECKPOINT CONFIG [k=v ...]``.
"""

from phoenix.eval.config import EvalConfig, EvalSetConfig, check_eval_inputs

__all__ = ["EvalCallback", "EvalConfig", "EvalResult", "EvalSetConfig", "Evaluator",
           "check_eval_inputs"]


def __getattr__(name):  # lazy: phoenix.config.schema imports phoenix.eval.config
    if name == "EvalCallback":
        from phoenix.eval.callback import EvalCallback

        return EvalCallback
    if name in ("Evaluator", "EvalResult"):
        from phoenix.eval import evaluator

        return getattr(evaluator, name)
    raise AttributeError(name)
