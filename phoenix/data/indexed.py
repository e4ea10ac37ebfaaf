"""Checks on megatron-core ``.bin/.idx`` prefixes, run before any training work."""

from __future__ import annotations

import contextlib
import json
import os
import traceback
from pathlib import Path

import numpy as np


class DataError(ValueError):
    """Training data is missing or inconsistent; the message names the file."""


_DATA_ONLY = False


def data_only_process() -> None:
    """Declare this process a data tool (``build-plan``, ``preprocess``, ``inspect-batch``):
    it reads and writes indexed datasets but never builds a model or runs a kernel.

    megatron-core's package import decorates its fused kernels with ``torch.compile``,
    which imports TorchDynamo: about 4.5 s of CPU, most of a data tool's start-up (a
    training process pays it anyway, for its model). In a data-only process megatron-core
    is imported with those decorations left out (:func:`indexed_dataset_module`)."""
    global _DATA_ONLY
    _DATA_ONLY = True


@contextlib.contextmanager
def _kernels_not_compiled():
    import torch

    def passthrough(fn=None, *args, **kwargs):
        return fn if callable(fn) else (lambda f: f)

    compile_ = torch.compile
    torch.compile = passthrough
    try:
        yield
    finally:
        torch.compile = compile_


def indexed_dataset_module():
    """megatron-core's ``indexed_dataset`` module, imported without its GPU-kernel notices
    (and, in a :func:`data_only_process`, without compiling megatron's fused kernels).

    Importing it pulls in megatron.core, which warns that Transformer Engine and apex are
    missing; data tools never run GPU kernels, so those warnings only mislead here.
    """
    import sys
    import warnings

    light = _DATA_ONLY and "megatron.core" not in sys.modules
    with warnings.catch_warnings(), (_kernels_not_compiled() if light else contextlib.nullcontext()):
        warnings.filterwarnings("ignore", message=".*(Transformer Engine|Apex|apex).*")
        from megatron.core.datasets import indexed_dataset
    return indexed_dataset


def check_prefix(prefix: str) -> dict:
    """Verify that ``prefix.bin``/``prefix.idx`` exist and agree; return basic facts.

    The ``.idx`` records each sequence's byte offset and length in the ``.bin``; the
    ``.bin`` must be exactly as long as its last sequence's end, otherwise the pair was
    mixed up or truncated (a partial copy, a rerun that rewrote only one file). Its
    ``document_indices`` must cut all sequences into documents (one sequence each as
    ``phoenix preprocess`` writes them, or several, e.g. one per sentence).
    """
    IndexedDataset = indexed_dataset_module().IndexedDataset
    bin_path, idx_path = Path(prefix + ".bin"), Path(prefix + ".idx")
    for path in (idx_path, bin_path):
        if not path.is_file():
            raise DataError(f"data prefix '{prefix}': missing file {path}")
    ds = IndexedDataset.__new__(IndexedDataset)
    try:
        ds.__init__(prefix, mmap=True)
    except Exception as e:  # a corrupt header raises assorted errors inside megatron
        # megatron's IndexedDataset.__del__ deletes these two unconditionally: without them
        # the half-built object's collection prints an AttributeError after our one line.
        for name in ("bin_reader", "index"):
            if name not in vars(ds):
                setattr(ds, name, None)
        raise DataError(f"data prefix '{prefix}': cannot read {idx_path}: {_describe(e)}; "
                        f"rebuild it with phoenix preprocess") from None
    lengths = ds.sequence_lengths
    num_sequences = len(lengths)
    if num_sequences == 0:
        raise DataError(f"data prefix '{prefix}': {idx_path} holds no sequences")
    itemsize = np.dtype(ds.index.dtype).itemsize
    end = int(ds.index.sequence_pointers[-1]) + int(lengths[-1]) * itemsize
    actual = os.path.getsize(bin_path)
    if actual != end:
        raise DataError(
            f"data prefix '{prefix}': {bin_path} has {actual} bytes but {idx_path} describes "
            f"{end} bytes; the .idx does not belong to this .bin (rebuild both)")
    # Documents are runs of sequences (several per document with sentence splitting).
    docs = np.asarray(ds.document_indices, dtype=np.int64)
    if len(docs) < 2 or docs[0] != 0 or docs[-1] != num_sequences or np.any(np.diff(docs) < 0):
        raise DataError(
            f"data prefix '{prefix}': {idx_path} has an inconsistent document index (it must "
            f"run from sequence 0 to all {num_sequences} sequences, never backwards); rebuild it")
    return {
        "num_sequences": num_sequences,
        "num_documents": len(docs) - 1,
        "num_tokens": int(lengths.sum(dtype=np.int64)),
        "dtype": np.dtype(ds.index.dtype).name,
    }


def _describe(e: Exception) -> str:
    """The exception's message, or for a bare ``assert`` in megatron, the failed check."""
    if str(e):
        return str(e)
    frame = traceback.extract_tb(e.__traceback__)[-1]
    return (f"{type(e).__name__} in {Path(frame.filename).name}:{frame.lineno}: "
            f"{(frame.line or '').strip()}")


def check_tokenizer(prefix: str, tokenizer, key: str, against: str) -> None:
    """Refuse ``prefix`` when its ``.meta.json`` records another tokenizer's fingerprint
    than ``tokenizer``'s (ConfigError naming ``key``, the prefix and ``against``, the
    tokenizer's own key and path); a prefix without a recorded fingerprint passes."""
    from phoenix.config import ConfigError

    fingerprint = (read_meta(prefix) or {}).get("tokenizer_fingerprint")
    if fingerprint and fingerprint != tokenizer.fingerprint:
        raise ConfigError(f"{key}: '{prefix}' was tokenised with a different tokenizer than "
                          f"{against} (fingerprints differ)")


def read_meta(prefix: str) -> dict | None:
    """``prefix.meta.json`` written by ``phoenix preprocess``, if present."""
    path = Path(prefix + ".meta.json")
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise DataError(f"data prefix '{prefix}': {path} is not valid JSON: {e}") from None
