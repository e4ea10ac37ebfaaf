"""Held-out evaluation: loss, perplexity and top-1/top-5 next-token accuracy per eval set,
and the needle-in-a-haystack (passkey retrieval) test.

The ``eval`` config section is :class:`phoenix.config.eval.EvalConfig`.

* :mod:`phoenix.eval.inputs`: input checks run before a model is built.
* :mod:`phoenix.eval.metrics`: per-micro-batch statistics from vocab-parallel logits.
* :mod:`phoenix.eval.evaluator`: :class:`Evaluator` (any TP/PP/DP layout).
* :mod:`phoenix.eval.callback`: :class:`EvalCallback` (periodic and end-of-run eval).
* :mod:`phoenix.eval.needle`: needle prompts, scoring and the accuracy table (pure).
* :mod:`phoenix.eval.needle_run`: greedy decoding on the model, :class:`NeedleEvaluator`,
  the heatmap.
* :mod:`phoenix.eval.run`: ``phoenix eval CHECKPOINT CONFIG [k=v ...]``.
"""
