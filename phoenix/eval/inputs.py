"""Checks of the eval sets that run with the other input checks, before a model is built."""

from __future__ import annotations

from typing import Optional

from phoenix.config import ConfigError
from phoenix.config.eval import EvalConfig


def check_eval_inputs(eval_cfg: Optional[EvalConfig], tokenizer, training_prefixes=()) -> list[str]:
    """Checks to run with the other input checks, before a model is built: every eval
    prefix exists and was tokenised with ``tokenizer``. Returns warnings (an eval set that
    is also a training dataset is not held out)."""
    if eval_cfg is None:
        return []
    from phoenix.data.indexed import check_prefix, read_meta

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
    return warnings
