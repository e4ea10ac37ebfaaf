"""SentencePiece tokenizer: a thin typed wrapper plus a deterministic trainer.

Token ids are ``int`` in ``[0, vocab_size)``. Models trained by :func:`train_sentencepiece`
use a fixed special-id layout so that every Phoenix dataset agrees on it::

    unk = 0, bos = 1, eos = 2 (used as end-of-document, "eod"), pad = none (-1)

There is no pad piece on purpose: pretraining packs documents into fixed-length samples
and masks with the loss mask, so a pad token would only waste an embedding row.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import logging
import os
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, TextIO

import sentencepiece as spm

logger = logging.getLogger(__name__)

_MODEL_TYPES = ("bpe", "unigram", "char", "word")


class SentencePieceTokenizer:
    """Wraps a ``sentencepiece`` model file.

    Args:
        model_file: path to a ``.model`` file.

    Raises:
        FileNotFoundError: if ``model_file`` does not exist (the message names the path).
    """

    def __init__(self, model_file: str | os.PathLike[str]) -> None:
        path = os.fspath(model_file)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"tokenizer model not found: {path}")
        with open(path, "rb") as f:
            self._setup(path, f.read())

    def _setup(self, model_file: str, proto: bytes) -> None:
        # Hash and load the *same* bytes, so the fingerprint always describes the model
        # actually in use, even if the file is replaced while we run.
        self._model_file = model_file
        self._proto = proto
        self._fingerprint = hashlib.sha256(proto).hexdigest()
        self._sp = spm.SentencePieceProcessor(model_proto=proto)

    @classmethod
    def _from_proto(cls, model_file: str, proto: bytes) -> SentencePieceTokenizer:
        obj = cls.__new__(cls)
        obj._setup(model_file, proto)
        return obj

    def __reduce__(self) -> tuple[Any, ...]:
        # Pickle the model bytes rather than the path: a worker process then uses exactly
        # the fingerprinted model and never touches the file system.
        return (SentencePieceTokenizer._from_proto, (self._model_file, self._proto))

    def __repr__(self) -> str:
        return (
            f"SentencePieceTokenizer({self._model_file!r}, vocab_size={self.vocab_size}, "
            f"fingerprint={self._fingerprint[:12]})"
        )

    @property
    def model_file(self) -> str:
        return self._model_file

    @property
    def fingerprint(self) -> str:
        """sha256 hex digest of the ``.model`` file bytes; identifies the tokenizer exactly."""
        return self._fingerprint

    @property
    def vocab_size(self) -> int:
        """Number of pieces; every id satisfies ``0 <= id < vocab_size``."""
        return int(self._sp.get_piece_size())

    @property
    def eod_id(self) -> int:
        """End-of-document id (the model's EOS piece), appended after each document."""
        eos = int(self._sp.eos_id())
        if eos < 0:
            raise ValueError(
                f"tokenizer {self._model_file} has no EOS piece, so it cannot mark end of "
                "document; train it with eos_id >= 0"
            )
        return eos

    @property
    def bos_id(self) -> int | None:
        """Beginning-of-sequence id, or ``None`` if the model has none."""
        bos = int(self._sp.bos_id())
        return bos if bos >= 0 else None

    @property
    def pad_id(self) -> int | None:
        """Padding id, or ``None`` if the model has none (the Phoenix default)."""
        pad = int(self._sp.pad_id())
        return pad if pad >= 0 else None

    def encode(self, text: str) -> list[int]:
        """Encode ``text`` to ids. No BOS/EOS is added; callers append ``eod_id`` themselves."""
        return self._sp.encode(text, out_type=int)

    def id_to_token(self, tid: int) -> str:
        """The piece of ``tid`` (``▁`` for a space)."""
        return self._sp.id_to_piece(int(tid))

    def decode(self, ids: Sequence[int]) -> str:
        """Decode ids back to text (lossless for models trained by :func:`train_sentencepiece`)."""
        return self._sp.decode([int(i) for i in ids])


def _open_text(path: str) -> TextIO:
    if path.endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8")  # type: ignore[return-value]
    return open(path, encoding="utf-8")


def _iter_sentences(files: Sequence[str], text_key: str | None) -> Iterator[str]:
    """Yield training "sentences": one per non-empty line of each document.

    SentencePiece trains line by line (and silently drops lines longer than
    ``max_sentence_length`` bytes), so documents are split on newlines here.
    """
    skipped = 0
    for path in files:
        with _open_text(path) as f:
            for line in f:
                text: Any = line
                if text_key is not None:
                    try:
                        text = json.loads(line)[text_key]
                    except (ValueError, KeyError, TypeError):
                        text = None
                    if not isinstance(text, str):
                        skipped += 1
                        continue
                for sentence in text.splitlines():
                    if sentence.strip():
                        yield sentence
    if skipped:
        logger.warning("tokenizer training skipped %d malformed JSONL lines", skipped)


def train_sentencepiece(
    text_files: Sequence[str | os.PathLike[str]],
    model_prefix: str | os.PathLike[str],
    vocab_size: int,
    model_type: str = "bpe",
    *,
    text_key: str | None = None,
    seed: int = 0,
    threads: int = 1,
    input_sentence_size: int = 0,
    extra_options: Mapping[str, Any] | None = None,
) -> str:
    """Train a byte-fallback SentencePiece model and return the path of ``PREFIX.model``.

    Args:
        text_files: plain-text files (``.gz`` allowed); one sentence per line. If ``text_key``
            is given they are JSONL files instead and ``obj[text_key]`` is used.
        model_prefix: writes ``PREFIX.model`` and ``PREFIX.vocab``.
        vocab_size: number of pieces, including the 256 byte pieces and 3 specials. It must
            be reachable from the data (SentencePiece raises otherwise); pass
            ``extra_options={"hard_vocab_limit": False}`` to make it an upper bound.
        model_type: ``bpe`` | ``unigram`` | ``char`` | ``word``.
        seed: seeds SentencePiece's RNG (used when sampling ``input_sentence_size`` lines).
        threads: trainer threads. The count is recorded in the model (so it is part of the
            fingerprint); keep it fixed, e.g. the default 1, for reproducible fingerprints.
        input_sentence_size: if > 0, train on a seeded random sample of this many lines.
        extra_options: passed to ``SentencePieceTrainer.train`` verbatim (override defaults).

    The model is lossless (``decode(encode(s)) == s``): identity normalization, whitespace
    kept, digits split, unknown characters fall back to bytes. Identical inputs and arguments
    give identical ``.model`` bytes (and thus fingerprints): the trainer is fed through an
    iterator, so no file paths are recorded in the model. Outputs are written to temporary
    names in the target directory and renamed into place, so readers never see a partial model.
    """
    files = [os.fspath(p) for p in text_files]
    if not files:
        raise ValueError("train_sentencepiece needs at least one input file")
    for path in files:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"tokenizer training input not found: {path}")
    if model_type not in _MODEL_TYPES:
        raise ValueError(f"model_type must be one of {_MODEL_TYPES}, got {model_type!r}")
    prefix = os.fspath(model_prefix)
    out_dir = os.path.dirname(os.path.abspath(prefix))
    os.makedirs(out_dir, exist_ok=True)

    options: dict[str, Any] = dict(
        vocab_size=vocab_size,
        model_type=model_type,
        byte_fallback=True,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        num_threads=threads,
        input_sentence_size=input_sentence_size,
        shuffle_input_sentence=True,
        character_coverage=1.0 if model_type != "char" else 0.9995,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True,
        split_digits=True,
        minloglevel=2,
    )
    options.update(extra_options or {})

    buf = io.BytesIO()
    spm.set_random_generator_seed(seed)
    spm.SentencePieceTrainer.train(
        sentence_iterator=_iter_sentences(files, text_key), model_writer=buf, **options
    )
    proto = buf.getvalue()
    sp = spm.SentencePieceProcessor(model_proto=proto)
    vocab_lines = "".join(
        f"{sp.id_to_piece(i)}\t{sp.get_score(i):g}\n" for i in range(sp.get_piece_size())
    )

    # Same directory as the destination, so os.replace is an atomic rename.
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=".spm-train-") as tmp:
        tmp_model, tmp_vocab = os.path.join(tmp, "m.model"), os.path.join(tmp, "m.vocab")
        with open(tmp_model, "wb") as f:
            f.write(proto)
        with open(tmp_vocab, "w", encoding="utf-8") as f:
            f.write(vocab_lines)
        # .vocab first: the .model is what consumers look for, so it lands last.
        os.replace(tmp_vocab, prefix + ".vocab")
        os.replace(tmp_model, prefix + ".model")
    return prefix + ".model"
