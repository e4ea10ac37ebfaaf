"""Checks of the eval sets that run with the other input checks, before a model is built."""

from __future__ import annotations

from typing import Optional

from phoenix.config import ConfigError
from phoenix.config.eval import EvalConfig


def check_eval_inputs(eval_cfg: Optional[EvalConfig], tokenizer, training_prefixes=()) -> list[str]:
    """Checks to run with the other input checks, before a model is built: every eval
    prefix (and the needle eval's haystack) exists and was tokenised with ``tokenizer``. Returns warnings (an eval set that
    is also a training dataset is not held out)."""
    if eval_cfg is None:
        return []
    from phoenix.data.indexed import DataError, check_prefix, read_meta

    warnings = []
    train = {str(p) for p in training_prefixes}
    for i, s in enumerate(eval_cfg.sets):
        check_prefix(s.prefix)
        fingerprint = (read_meta(s.prefix) or {}).get("tokenizer_fingerprint")
        if fingerprint and fingerprint != tokenizer.fingerprint:
            raise ConfigError(f"eval.sets[{i}]: '{s.prefix}' was tokenised with a different "
                              f"tokenizer than tokenizer.model (fingerprints differ)")
        if s.prefix in train:
            warnings.append(f"eval.sets[{i}] '{s.display_name}': {s.prefix} is also a training "
                            f"dataset; it is not held out")
    needle = eval_cfg.needle
    if needle is not None:
        try:
            check_prefix(needle.haystack_prefix)
        except DataError as e:
            raise DataError(f"eval.needle.haystack_prefix: {e}") from None
        fingerprint = (read_meta(needle.haystack_prefix) or {}).get("tokenizer_fingerprint")
        if fingerprint and fingerprint != tokenizer.fingerprint:
            raise ConfigError(f"eval.needle.haystack_prefix: '{needle.haystack_prefix}' was "
                              f"tokenised with a different tokenizer than tokenizer.model "
                              f"(fingerprints differ)")
    return warnings
