"""Checks of the eval sets that run with the other input checks, before a model is built."""

from __future__ import annotations

from typing import Optional

from phoenix.config.eval import EvalConfig


def check_eval_inputs(eval_cfg: Optional[EvalConfig], tokenizer, training_prefixes=(),
                      against: str = "tokenizer.model") -> list[str]:
    """Checks to run with the other input checks, before a model is built: every eval
    prefix (and the needle eval's haystack) exists and was tokenised with ``tokenizer``
    (``against``: its key and path, for the message). Returns warnings (an eval set that
    is also a training dataset is not held out)."""
    if eval_cfg is None:
        return []
    from phoenix.data.indexed import DataError, check_prefix, check_tokenizer

    warnings = []
    train = {str(p) for p in training_prefixes}
    for i, s in enumerate(eval_cfg.sets):
        check_prefix(s.prefix)
        check_tokenizer(s.prefix, tokenizer, f"eval.sets[{i}]", against)
        if s.prefix in train:
            warnings.append(f"eval.sets[{i}] '{s.display_name}': {s.prefix} is also a training "
                            f"dataset; it is not held out")
    needle = eval_cfg.needle
    if needle is not None:
        try:
            check_prefix(needle.haystack_prefix)
        except DataError as e:
            raise DataError(f"eval.needle.haystack_prefix: {e}") from None
        check_tokenizer(needle.haystack_prefix, tokenizer, "eval.needle.haystack_prefix", against)
    return warnings
