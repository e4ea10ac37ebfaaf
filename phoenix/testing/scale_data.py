"""Large ``.bin/.idx`` prefixes written fast, for cache tests and scale benchmarks.

:func:`write_prefix` writes the ``.idx`` with numpy in megatron-core's format (the bytes
``IndexedDatasetBuilder.finalize`` writes: one sequence per document) and the ``.bin``
either with random token ids or, ``sparse=True``, as a sparse file of the right size
(``truncate``: no disk blocks, reads return token 0), so tens of billions of tokens cost
only their ``.idx`` (20 bytes per document) on disk.
"""

from __future__ import annotations

import struct

import numpy as np

_HEADER = b"MMIDIDX\x00\x00"
_DTYPE_CODES = {np.dtype(np.uint8): 1, np.dtype(np.int32): 4, np.dtype(np.uint16): 8}


def lognormal_lengths(num_documents: int, mean: float, rng: np.random.Generator,
                      sigma: float = 1.0, minimum: int = 16) -> np.ndarray:
    """int32 document lengths, lognormal with the given mean (tokens), at least ``minimum``."""
    mu = np.log(mean) - sigma ** 2 / 2
    return np.maximum(rng.lognormal(mu, sigma, num_documents), minimum).astype(np.int32)


def write_prefix(prefix: str, lengths: np.ndarray, *, dtype=np.uint16, sparse: bool = False,
                 seed: int = 0, vocab: int = 1000, eod_id: int = 2) -> None:
    """``prefix.idx`` for one document per sequence of ``lengths`` tokens, and
    ``prefix.bin``: sparse (zeros) or random ids in ``[3, vocab)`` ending each document
    with ``eod_id``."""
    lengths = np.asarray(lengths, dtype=np.int32)
    dtype = np.dtype(dtype)
    pointers = np.zeros(len(lengths), dtype=np.int64)
    np.cumsum(lengths[:-1], dtype=np.int64, out=pointers[1:])
    pointers *= dtype.itemsize
    with open(prefix + ".idx", "wb") as f:
        f.write(_HEADER + struct.pack("<Q", 1) + struct.pack("<B", _DTYPE_CODES[dtype]))
        f.write(struct.pack("<Q", len(lengths)) + struct.pack("<Q", len(lengths) + 1))
        f.write(lengths.tobytes())
        f.write(pointers.tobytes())
        f.write(np.arange(len(lengths) + 1, dtype=np.int64).tobytes())
    total = int(lengths.sum(dtype=np.int64))
    with open(prefix + ".bin", "wb") as f:
        if sparse:
            f.truncate(total * dtype.itemsize)
            return
        rng = np.random.default_rng(seed)
        tokens = rng.integers(3, vocab, size=total).astype(dtype)
        tokens[np.cumsum(lengths, dtype=np.int64) - 1] = eod_id
        f.write(tokens.tobytes())


def group_ids(num_documents: int, mean_docs: float, rng: np.random.Generator) -> np.ndarray:
    """int64 non-decreasing group id per document; groups of 1 + geometric documents."""
    sizes = rng.geometric(1.0 / mean_docs, size=num_documents)
    ends = np.cumsum(sizes)
    ends = ends[: np.searchsorted(ends, num_documents) + 1]
    return np.repeat(np.arange(len(ends), dtype=np.int64), np.diff(ends, prepend=0))[:num_documents]
