"""Tokenizers for Phoenix: sentencepiece ``.model`` files and Hugging Face ``tokenizer.json``.

Both backends have one interface (``encode``, ``decode``, ``vocab_size``, ``eod_id``,
``bos_id``, ``pad_id``, ``fingerprint``, ``model_file``); :func:`load_tokenizer` picks
one from ``tokenizer.model`` (by file type) or ``tokenizer.hf_dir``.
"""

from __future__ import annotations

import os
from typing import Union

from phoenix.config import TokenizerConfig
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


__all__ = ["HFTokenizer", "SentencePieceTokenizer", "Tokenizer", "load_tokenizer",
           "train_sentencepiece"]
