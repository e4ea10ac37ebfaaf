"""A run's inputs, resolved once before any model is built: :func:`check_inputs`.

The tokenizer is loaded here and nowhere else in a training job; the vocabulary the model
is built for, the end-of-document id and the job's last step are derived here once and
handed to the data source, the evaluators and the checkpointer (``Trainer.inputs``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from phoenix.config import ConfigError, RunConfig
from phoenix.data.indexed import check_prefix, check_tokenizer
from phoenix.eval.inputs import check_eval_inputs
from phoenix.tokenizer import Tokenizer, load_tokenizer, model_vocab_size

log = logging.getLogger("phoenix.train")


@dataclass(frozen=True)
class RunInputs:
    """What the run's inputs resolve to (see the module docstring)."""

    tokenizer: Tokenizer
    vocab_size: int
    """Rows of the embedding before padding: ``model.vocab_size``, else the tokenizer's."""
    eod_id: int
    """The tokenizer's end-of-document id (document masks, the EOD loss mask)."""
    last_step: int
    """The last step this job trains: ``train.stop_at_step`` when set, else ``train.steps``."""


def check_inputs(cfg: RunConfig) -> RunInputs:
    """Tokenizer, data and eval-set checks that must fail before any model is built.

    Raises ConfigError (the tokenizer cannot be loaded, is larger than
    ``model.vocab_size``, or a dataset / eval set was tokenised with another one) or
    DataError (a missing or damaged prefix), naming the key and the file. Warns once when
    an eval set is also a training dataset."""
    key = "tokenizer.model" if cfg.tokenizer.model is not None else "tokenizer.hf_dir"
    try:
        tokenizer = load_tokenizer(cfg.tokenizer)
    except (OSError, RuntimeError, ValueError) as e:  # sentencepiece: RuntimeError on a bad file
        raise ConfigError(f"{key}: cannot load {cfg.tokenizer.path}: {e}") from None
    if cfg.model.vocab_size is not None and tokenizer.vocab_size > cfg.model.vocab_size:
        raise ConfigError(
            f"model.vocab_size: the tokenizer {cfg.tokenizer.path} has {tokenizer.vocab_size} "
            f"tokens, more than the model's vocab_size {cfg.model.vocab_size}")
    against = f"{key} {cfg.tokenizer.path}"
    for i, entry in enumerate(cfg.data.datasets):
        check_prefix(entry.prefix)
        check_tokenizer(entry.prefix, tokenizer, f"data.datasets[{i}]", against)
    for warning in check_eval_inputs(cfg.eval, tokenizer, [e.prefix for e in cfg.data.datasets],
                                     against):
        log.warning(warning)
    train = cfg.train
    return RunInputs(tokenizer=tokenizer, vocab_size=model_vocab_size(cfg, tokenizer),
                     eod_id=tokenizer.eod_id,
                     last_step=min(train.steps, train.stop_at_step or train.steps))
