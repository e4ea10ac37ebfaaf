"""Hugging Face tokenizers (``tokenizer.json``) through the ``tokenizers`` library.

No ``transformers`` at run time: the fast tokenizer's own file holds the whole pipeline
(normalizer, pre-tokenizer, BPE model, post-processor, added tokens). The conventions of
the source model are kept, not re-invented:

* :meth:`HFTokenizer.encode` applies the file's post-processor, so Llama-3 documents
  start with ``<|begin_of_text|>`` exactly as Meta pretrained them (the data pipeline then
  appends :attr:`eod_id` after each document, as for sentencepiece).
* BOS / EOS (end of document) / PAD come from ``tokenizer_config.json`` when there is one
  (``bos_token``, ``eos_token``, ``pad_token``), else from the post-processor's template
  (BOS) and well-known special tokens (EOS: ``<|end_of_text|>``, ``<|endoftext|>``,
  ``</s>``, ``<eos>``).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

_KNOWN_EOS = ("<|end_of_text|>", "<|endoftext|>", "</s>", "<eos>")
_KNOWN_BOS = ("<|begin_of_text|>", "<s>", "<bos>")


def _token_content(value) -> Optional[str]:
    """``"<s>"`` or ``{"content": "<s>", ...}`` (tokenizer_config.json) -> ``"<s>"``."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


class HFTokenizer:
    """A Hugging Face fast tokenizer (``tokenizer.json``) with the phoenix interface of
    :class:`~phoenix.tokenizer.SentencePieceTokenizer`.

    Args:
        tokenizer_file: the ``tokenizer.json``.
        config_file: its ``tokenizer_config.json`` (optional; names BOS / EOS / PAD).

    Raises:
        FileNotFoundError: a file is missing (the message names it).
        ValueError: the file is not a tokenizer.json, or a named special token is not in
            the vocabulary.
    """

    def __init__(self, tokenizer_file: str | os.PathLike[str],
                 config_file: str | os.PathLike[str] | None = None) -> None:
        path = os.fspath(tokenizer_file)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"tokenizer file not found: {path}")
        config = None
        if config_file is not None:
            if not os.path.isfile(config_file):
                raise FileNotFoundError(f"tokenizer config not found: {config_file}")
            config = Path(config_file).read_bytes()
        self._setup(path, Path(path).read_bytes(), config)

    @classmethod
    def from_dir(cls, folder: str | os.PathLike[str]) -> HFTokenizer:
        """A Hugging Face tokenizer folder: ``tokenizer.json`` (+ ``tokenizer_config.json``)."""
        folder = Path(folder)
        if not folder.is_dir():
            raise FileNotFoundError(f"tokenizer folder not found: {folder}")
        config = folder / "tokenizer_config.json"
        return cls(folder / "tokenizer.json", config if config.is_file() else None)

    def _setup(self, path: str, blob: bytes, config: bytes | None) -> None:
        from tokenizers import Tokenizer

        self._model_file, self._blob, self._config_blob = path, blob, config
        try:
            self._tok = Tokenizer.from_str(blob.decode("utf-8"))
        except Exception as e:  # tokenizers raises a bare Exception on a bad file
            raise ValueError(f"{path}: not a Hugging Face tokenizer.json ({e})") from None
        cfg = json.loads(config) if config else {}
        self._bos = self._special(cfg, "bos_token", self._template_bos(), _KNOWN_BOS)
        self._eos = self._special(cfg, "eos_token", None, _KNOWN_EOS)
        self._pad = self._special(cfg, "pad_token", None, ())
        # The ids of the special tokens are part of the identity: same file, another EOS
        # choice gives other data.
        ident = blob + f"|bos={self._bos}|eos={self._eos}|pad={self._pad}".encode()
        self._fingerprint = hashlib.sha256(ident).hexdigest()

    def _template_bos(self) -> Optional[int]:
        """The special token a TemplateProcessing post-processor puts before ``$A``."""
        post = json.loads(self._blob).get("post_processor") or {}
        processors = post.get("processors", [post]) if post.get("type") == "Sequence" else [post]
        for proc in processors:
            if proc.get("type") != "TemplateProcessing":
                continue
            first = (proc.get("single") or [{}])[0]
            if "SpecialToken" in first:
                return self._tok.token_to_id(first["SpecialToken"]["id"])
        return None

    def _special(self, cfg: dict, key: str, fallback: Optional[int],
                 known: Sequence[str]) -> Optional[int]:
        if key in cfg:
            content = _token_content(cfg[key])
            if content is None:
                return None
            tid = self._tok.token_to_id(content)
            if tid is None:
                raise ValueError(f"{self._model_file}: tokenizer_config.json {key} {content!r} "
                                 f"is not in the vocabulary")
            return tid
        if fallback is not None:
            return fallback
        for content in known:
            tid = self._tok.token_to_id(content)
            if tid is not None:
                return tid
        return None

    @classmethod
    def _from_bytes(cls, path: str, blob: bytes, config: bytes | None) -> HFTokenizer:
        obj = cls.__new__(cls)
        obj._setup(path, blob, config)
        return obj

    def __reduce__(self) -> tuple[Any, ...]:
        # The fingerprinted bytes travel to worker processes, not the path.
        return (HFTokenizer._from_bytes, (self._model_file, self._blob, self._config_blob))

    def __repr__(self) -> str:
        return (f"HFTokenizer({self._model_file!r}, vocab_size={self.vocab_size}, "
                f"fingerprint={self._fingerprint[:12]})")

    @property
    def model_file(self) -> str:
        return self._model_file

    @property
    def fingerprint(self) -> str:
        """sha256 of the tokenizer.json bytes and the chosen BOS/EOS/PAD ids."""
        return self._fingerprint

    @property
    def vocab_size(self) -> int:
        """Every id, added (special) tokens included: ``0 <= id < vocab_size``."""
        return int(self._tok.get_vocab_size(with_added_tokens=True))

    @property
    def eod_id(self) -> int:
        """End-of-document id (the model's EOS, e.g. Llama-3 ``<|end_of_text|>``)."""
        if self._eos is None:
            raise ValueError(f"tokenizer {self._model_file} has no EOS token (no eos_token in "
                             f"tokenizer_config.json, none of {', '.join(_KNOWN_EOS)}), so it "
                             f"cannot mark end of document")
        return self._eos

    @property
    def bos_id(self) -> int | None:
        return self._bos

    @property
    def pad_id(self) -> int | None:
        return self._pad

    @property
    def backend(self):
        """The ``tokenizers.Tokenizer``."""
        return self._tok

    def encode(self, text: str) -> list[int]:
        """Ids of ``text`` with the file's post-processor (e.g. Llama-3's BOS); no EOD."""
        return self._tok.encode(text).ids

    def id_to_token(self, tid: int) -> Optional[str]:
        """The vocabulary entry of ``tid`` (byte-level string for a byte-level BPE)."""
        return self._tok.id_to_token(int(tid))

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids``, special tokens included."""
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)
