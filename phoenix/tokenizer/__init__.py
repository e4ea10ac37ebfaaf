"""Tokenizers for Phoenix: sentencepiece ``.model`` files and Hugging Face ``tokenizer.json``.

Both backends have one interface (``encode``, ``decode``, ``vocab_size``, ``eod_id``,
``bos_id``, ``pad_id``, ``fingerprint``, ``model_file``); :func:`load_tokenizer` picks
one from ``tokenizer.model`` (by file type) or ``tokenizer.hf_dir``.
"""

from __future__ import annotations

import os
from typing import Optional, Union

from phoenix.config import RunConfig, TokenizerConfig
from phoenix.tokenizer.hf_tokenizer import HFTokenizer
from phoenix.tokenizer.sentencepiece_tokenizer import SentencePieceTokenizer, train_sentencepiece

Tokenizer = Union[SentencePieceTokenizer, HFTokenizer]


def load_tokenizer(source: TokenizerConfig | str | os.PathLike[str]) -> Tokenizer:
    """The tokenizer of a ``tokenizer`` config section, or of a path: a sentencepiece
    ``.model``, a ``tokenizer.json``, or a Hugging Face tokenizer folder.

    Raises FileNotFoundError naming a missing path; a file that is neither a
    ``tokenizer.json`` nor a sentencepiece model is refused naming it."""
    if isinstance(source, TokenizerConfig):
        if source.hf_dir is not None:
            return HFTokenizer.from_dir(source.hf_dir)
        source = source.model
    path = os.fspath(source)
    if os.path.isdir(path):
        return HFTokenizer.from_dir(path)
    if path.endswith(".json"):
        return HFTokenizer(path)
    # Anything else is read as a sentencepiece model (whatever its suffix); a file that is
    # not one is refused by SentencePieceTokenizer with its path.
    return SentencePieceTokenizer(path)


def model_vocab_size(cfg: RunConfig, tokenizer: Optional[Tokenizer] = None) -> int:
    """The vocabulary a run's model is built for (embedding and output rows before
    padding): ``model.vocab_size``, else the tokenizer's size. ``tokenizer``: the run's
    (``cfg.tokenizer``), loaded here only when it is needed and not given, raising what
    :func:`load_tokenizer` raises."""
    if cfg.model.vocab_size is not None:
        return cfg.model.vocab_size
    return (tokenizer if tokenizer is not None else load_tokenizer(cfg.tokenizer)).vocab_size


__all__ = ["HFTokenizer", "SentencePieceTokenizer", "Tokenizer", "load_tokenizer",
           "model_vocab_size", "train_sentencepiece"]
