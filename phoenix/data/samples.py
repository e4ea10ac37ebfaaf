"""Fixed-length training samples of one tokenised prefix, read straight from its ``.bin``.

Sequences are stored back to back in the ``.bin``, so the dataset is one token stream and
a sample is a slice of it: ``seq_length + 1`` tokens starting at a multiple of
``seq_length`` (inputs and shifted labels share the extra token, as in megatron's
GPTDataset). Without groups the stream is cut regardless of document boundaries
(standard packing; the EOD tokens mark them). With groups (``PREFIX.groups.npy``), each
group is cut on its own so that no sample crosses a group boundary; a group's last,
short sample is padded with EOD tokens that carry no loss.

Documents are the ``.idx``'s ``document_indices``, not its sequences: ``phoenix
preprocess`` writes one sequence per document, but Megatron-LM's preprocessing with
sentence splitting writes one sequence per sentence, several per document. Document ids
(provenance) and a ``.groups.npy`` with one id per document follow ``document_indices``;
a ``.groups.npy`` with one id per sequence is accepted too.

Reading a sample is one slice of a memory map: no per-document assembly, no copies
beyond the sample itself.

**Group packing** (``pack_groups = P``, grouped datasets only) removes most of that
padding: the groups, in a fixed seeded shuffle, are joined into *units* of consecutive
groups, each cut as one stream, so only a unit's last sample is padded. A unit of two or
more groups holds at most ``P`` samples; the split into units minimises the dataset's
total samples (an exact dynamic programme, ``pack_units`` in ``csrc/``). The plan keeps
each unit in one batch as it keeps a group, so every group of a unit does too; a sample
may join the end of one group and the start of the next only inside a unit (the EOD
between them keeps the document boundary for ``data.document_mask``). The shuffled
stream is a view like the one below; ``group_ids`` are then unit ids (what the plan keeps
whole), while a read sample's ``group_id`` is still the group of its first token.

A **document-length view** (``min_document_tokens``) keeps only the documents of at
least that many tokens. Its token stream is those documents back to back, so a sample
may join the end of one kept document and the start of the next kept one (they are
separated by their EOD as in the full stream); the reader copies it from those two
places in the ``.bin``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from phoenix.data.indexed import DataError, check_prefix, indexed_dataset_module
from phoenix.data.native import plan_cpp
from phoenix.data.plan_groups import groups_digest


@dataclass
class SampleIndex:
    """Where each sample of a dataset starts and ends in its token stream."""

    prefix: str
    seq_length: int
    starts: np.ndarray
    """int64 [num_samples]: token offset of the sample's first token."""
    lengths: np.ndarray
    """int32 [num_samples]: real tokens in the sample (seq_length + 1 unless padded)."""
    group_ids: np.ndarray | None
    """int64 [num_samples]: the group of each sample (non-decreasing), or None."""
    doc_starts: np.ndarray
    """int64 [num_documents + 1]: token offset where each document starts (and the end);
    documents as the ``.idx``'s ``document_indices`` define them (an empty document
    starts where the next one does)."""

    view: "DocumentView | None" = None
    """Set for a ``min_document_tokens`` view or group packing: ``starts`` are then offsets
    in the view's stream, mapped to the ``.bin`` by :meth:`physical_ranges`."""
    pack_groups: int = 0
    """Group packing's largest unit of several groups, in samples (0: off)."""
    groups_digest: str | None = None
    """``phoenix.data.plan.groups_digest(group_ids)`` (grouped indices): stored with the
    cached index so that a plan's fingerprint needs no pass over the ids."""

    def __len__(self) -> int:
        return len(self.starts)

    def document_of(self, token_offset: int) -> int:
        """Id of the document holding the token at ``token_offset`` (never an empty one);
        ``token_offset`` in the ``.bin``."""
        return int(np.searchsorted(self.doc_starts, token_offset, side="right") - 1)

    def physical_ranges(self, start: int, n: int) -> list[tuple[int, int]]:
        """``(bin_offset, count)`` pieces holding tokens ``[start, start + n)`` of this
        index's stream (one piece unless it is a view and the range crosses documents)."""
        if self.view is None:
            return [(start, n)]
        v = self.view
        pieces, k = [], int(np.searchsorted(v.starts, start, side="right") - 1)
        while n > 0:
            take = min(n, int(v.starts[k + 1]) - start)
            pieces.append((int(v.bin_starts[k]) + start - int(v.starts[k]), take))
            start, n, k = start + take, n - take, k + 1
        return pieces


@dataclass(frozen=True)
class DocumentView:
    """Pieces of the ``.bin`` read as one stream: the documents a ``min_document_tokens``
    view keeps, or a grouped dataset's groups in group packing's shuffled order."""

    min_document_tokens: int
    documents: np.ndarray
    """int64 [k]: ids of the kept documents (group packing: of the groups, in file order)."""
    starts: np.ndarray
    """int64 [k + 1]: where each kept document starts in the view's stream (and the end)."""
    bin_starts: np.ndarray
    """int64 [k]: where each kept document starts in the ``.bin``."""


def document_view(prefix: str, doc_starts: np.ndarray, min_document_tokens: int) -> DocumentView:
    """The view of the documents with at least ``min_document_tokens`` tokens."""
    lengths = np.diff(doc_starts)
    kept = np.flatnonzero(lengths >= min_document_tokens).astype(np.int64)
    if len(kept) == 0:
        raise DataError(f"data prefix '{prefix}': no document has min_document_tokens "
                        f"{min_document_tokens} tokens (the longest has {int(lengths.max(initial=0))})")
    starts = np.concatenate([[0], np.cumsum(lengths[kept], dtype=np.int64)])
    return DocumentView(min_document_tokens, kept, starts, doc_starts[kept])


def cut_range(begin: int, end: int, seq_length: int) -> tuple[np.ndarray, np.ndarray]:
    """Samples covering tokens [begin, end): starts every seq_length, >= 2 tokens each."""
    if end - begin < 2:
        return np.empty(0, np.int64), np.empty(0, np.int32)
    starts = np.arange(begin, end - 1, seq_length, dtype=np.int64)
    lengths = np.minimum(end - starts, seq_length + 1).astype(np.int32)
    return starts, lengths


def build_sample_index(prefix: str, seq_length: int, use_groups: bool,
                       min_document_tokens: int = 0, pack_groups: int = 0) -> SampleIndex:
    """Index the samples of ``prefix``; with ``use_groups``, cut at group boundaries
    (with ``pack_groups``, at unit boundaries); with ``min_document_tokens``, of the
    view of the documents at least that long."""
    IndexedDataset = indexed_dataset_module().IndexedDataset
    check_prefix(prefix)
    ds = IndexedDataset(prefix, mmap=True)
    # The token stream is the .bin: sequence i starts at seq_starts[i] (check_prefix has
    # verified that document_indices are sequence indices from 0 to the last).
    seq_starts = np.concatenate([[0], np.cumsum(ds.sequence_lengths, dtype=np.int64)])
    doc_starts = seq_starts[np.asarray(ds.document_indices, dtype=np.int64)]
    total = int(seq_starts[-1])
    if min_document_tokens:
        if use_groups:
            raise DataError(f"data prefix '{prefix}': min_document_tokens cannot be combined "
                            f"with group_mode batch")
        view = document_view(prefix, doc_starts, min_document_tokens)
        starts, sample_lengths = cut_range(0, int(view.starts[-1]), seq_length)
        if len(starts) == 0:
            raise DataError(f"data prefix '{prefix}': the documents of >= {min_document_tokens} "
                            f"tokens are too few for one sample")
        return SampleIndex(prefix, seq_length, starts, sample_lengths, None, doc_starts, view)
    if not use_groups:
        starts, sample_lengths = cut_range(0, total, seq_length)
        if len(starts) == 0:
            raise DataError(f"data prefix '{prefix}': {total} tokens is too few for one sample")
        return SampleIndex(prefix, seq_length, starts, sample_lengths, None, doc_starts)

    groups_path = Path(prefix + ".groups.npy")
    if not groups_path.is_file():
        raise DataError(f"data prefix '{prefix}': group_mode needs {groups_path} "
                        f"(preprocess with --group-key)")
    unit_groups = load_groups(prefix, num_documents=len(doc_starts) - 1,
                              num_sequences=len(seq_starts) - 1)
    # One id per document or per sequence: the token offsets where those units start.
    unit_starts = doc_starts if len(unit_groups) == len(doc_starts) - 1 else seq_starts
    # Token range of each group: from its first unit's start to its last's end.
    boundaries = np.flatnonzero(np.diff(unit_groups)) + 1
    group_unit_starts = np.concatenate([[0], boundaries, [len(unit_groups)]])
    bounds = unit_starts[group_unit_starts]
    view = None
    if pack_groups:
        view, bounds = _pack(bounds, seq_length, pack_groups)
    starts, lengths, groups = _cut_ranges(bounds[:-1], bounds[1:], seq_length)
    if len(starts) == 0:
        raise DataError(f"data prefix '{prefix}': no group has enough tokens for a sample")
    return SampleIndex(prefix, seq_length, starts, lengths, groups, doc_starts, view,
                       pack_groups=pack_groups, groups_digest=groups_digest(groups))


PACK_SEED = 0x7068656E6978  # the fixed shuffle of group packing (independent of train.seed)
PACK_MAX_GROUPS = 1024      # groups per unit considered by the packing programme


def _pack(bounds: np.ndarray, seq_length: int, pack_groups: int
          ) -> tuple[DocumentView, np.ndarray]:
    """Group packing of the groups with ``.bin`` token ranges ``[bounds[g], bounds[g+1])``:
    the view of the groups in a fixed shuffle and the unit boundaries in its stream."""
    order = np.random.default_rng(PACK_SEED).permutation(len(bounds) - 1).astype(np.int64)
    sizes = np.diff(bounds)[order]
    starts = np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)])
    units = plan_cpp().pack_units(sizes, seq_length, pack_groups, PACK_MAX_GROUPS)
    return DocumentView(0, order, starts, bounds[:-1][order]), starts[units]


def groups_per_unit(index: SampleIndex) -> np.ndarray:
    """int64 [units]: how many groups each unit of a group-packed index joins (all ones
    without packing); units in id order. Groups of fewer than 2 tokens hold no sample and
    are not counted."""
    if index.group_ids is None:
        raise ValueError("groups_per_unit: the index is not grouped")
    if not index.pack_groups:
        return np.ones(int(index.group_ids[-1]) + 1 if len(index) else 0, dtype=np.int64)
    ids = np.asarray(index.group_ids)
    first = np.flatnonzero(np.diff(ids, prepend=-1))
    last = np.append(first[1:], len(ids)) - 1
    begin = np.asarray(index.starts)[first]
    end = np.asarray(index.starts)[last] + np.asarray(index.lengths)[last]
    seg = np.asarray(index.view.starts)
    lengths = np.diff(seg)
    # segments (groups) of >= 2 tokens whose start lies inside the unit
    nonempty = np.concatenate([[0], np.cumsum(lengths >= 2)])
    return nonempty[np.searchsorted(seg[:-1], end, "left")] - nonempty[np.searchsorted(seg[:-1], begin, "left")]


def _cut_ranges(begins: np.ndarray, ends: np.ndarray, seq_length: int
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`cut_range` of every range ``[begins[g], ends[g])`` on its own, vectorised:
    (starts int64, lengths int32, range id int64 of each sample), ranges in order."""
    begins = np.asarray(begins, dtype=np.int64)
    ends = np.asarray(ends, dtype=np.int64)
    # cut_range's np.arange(begin, end - 1, seq_length) has ceil((end - 1 - begin) / seq) items
    counts = np.maximum(ends - 1 - begins, 0)
    counts += seq_length - 1
    counts //= seq_length
    first = np.cumsum(counts) - counts          # index of each range's first sample
    ids = np.repeat(np.arange(len(begins), dtype=np.int64), counts)
    # sample i of range g starts at begins[g] + (i - first[g]) * seq_length
    starts = np.arange(len(ids), dtype=np.int64)
    starts -= first[ids]
    starts *= seq_length
    starts += begins[ids]
    lengths = ends[ids]
    lengths -= starts
    np.minimum(lengths, seq_length + 1, out=lengths)
    return starts, lengths.astype(np.int32), ids


def load_groups(prefix: str, num_documents: int, num_sequences: int) -> np.ndarray:
    """``PREFIX.groups.npy``, checked: a 1-D integer array, non-decreasing, with one id per
    document (what ``phoenix preprocess`` writes) or one per sequence. Raises DataError
    naming the file otherwise."""
    path = Path(prefix + ".groups.npy")
    try:
        groups = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:  # not an .npy file, truncated, pickled objects
        raise DataError(f"data prefix '{prefix}': cannot read {path}: {e}") from None
    if groups.ndim != 1 or not np.issubdtype(groups.dtype, np.integer):
        raise DataError(f"data prefix '{prefix}': {path} must be a 1-D integer array, got "
                        f"shape {groups.shape} of {groups.dtype}")
    if len(groups) not in (num_documents, num_sequences):
        per_seq = f" (or {num_sequences} sequences)" if num_sequences != num_documents else ""
        raise DataError(f"data prefix '{prefix}': {path} has {len(groups)} entries but the "
                        f"dataset has {num_documents} documents{per_seq}; it needs one group "
                        f"id per document")
    if len(groups) and np.any(np.diff(groups) < 0):
        raise DataError(f"data prefix '{prefix}': {path} is not sorted; the documents of "
                        f"a group must be adjacent")
    return groups.astype(np.int64, copy=False)


class SampleReader:
    """Reads samples of one :class:`SampleIndex` from the memory-mapped ``.bin``.

    ``vocab_size``: when given, every sample read is checked to hold only token ids in
    ``[0, vocab_size)`` (one vectorised max/min per sample); an id outside it -- data
    tokenised with another tokenizer, which a dataset without ``.meta.json`` cannot be
    checked for up front -- raises :class:`DataError` naming the dataset, the sample, the
    document and the token, instead of an IndexError in the embedding. ``name``: the
    dataset's name for that message.
    """

    def __init__(self, index: SampleIndex, eod_id: int, vocab_size: int | None = None,
                 name: str | None = None):
        # the token dtype is byte 17 of the .idx header (after the magic and the version):
        # reading it is cheaper than opening the index at every start
        with open(index.prefix + ".idx", "rb") as f:
            dtype = indexed_dataset_module().DType.dtype_from_code(f.read(18)[17])
        self.index = index
        self.eod_id = eod_id
        self.vocab_size = vocab_size
        self.name = name
        self.tokens = np.memmap(index.prefix + ".bin", dtype=dtype, mode="r")

    def read(self, sample_id: int) -> dict:
        """tokens/labels/position_ids int64 [seq], loss_mask float32 [seq], and provenance."""
        seq = self.index.seq_length
        start = int(self.index.starts[sample_id])
        n = int(self.index.lengths[sample_id])
        text = np.full(seq + 1, self.eod_id, dtype=np.int64)
        pieces = self.index.physical_ranges(start, n)
        at = 0
        for bin_start, count in pieces:
            text[at:at + count] = self.tokens[bin_start:bin_start + count]
            at += count
        if self.vocab_size is not None:
            self._check_ids(sample_id, pieces, text[:n])
        loss_mask = np.zeros(seq, dtype=np.float32)
        loss_mask[: n - 1] = 1.0  # label positions that are real tokens
        return {
            "tokens": text[:-1],
            "labels": text[1:],
            "loss_mask": loss_mask,
            "position_ids": np.arange(seq, dtype=np.int64),
            **self.provenance(sample_id, pieces[0][0]),
        }

    def provenance(self, sample_id: int, bin_start: int | None = None) -> dict:
        """``sample_id``, ``group_id`` (-1: ungrouped) and ``document_id`` (of its first
        token) of a sample, without reading its tokens. ``bin_start``: its first token's
        ``.bin`` offset when already known."""
        if bin_start is None:
            bin_start = self.index.physical_ranges(int(self.index.starts[sample_id]),
                                                   int(self.index.lengths[sample_id]))[0][0]
        group = -1 if self.index.group_ids is None else int(self.index.group_ids[sample_id])
        if self.index.pack_groups:  # the group of the sample's first token, not its unit
            v = self.index.view
            group = int(v.documents[np.searchsorted(v.starts, int(self.index.starts[sample_id]),
                                                    side="right") - 1])
        return {"sample_id": sample_id, "group_id": group,
                "document_id": self.index.document_of(bin_start)}

    def _check_ids(self, sample_id: int, pieces: list[tuple[int, int]], ids: np.ndarray) -> None:
        if ids.max() < self.vocab_size and ids.min() >= 0:
            return
        at = int(np.flatnonzero((ids >= self.vocab_size) | (ids < 0))[0])
        bad = ids[at]
        for start, count in pieces:  # the .bin offset of the bad token
            if at < count:
                break
            at -= count
        prefix = self.index.prefix
        who = f"dataset '{self.name}' ({prefix})" if self.name else f"data prefix '{prefix}'"
        raise DataError(
            f"{who}: sample {sample_id} holds token id {int(bad)}, outside the vocabulary "
            f"[0, {self.vocab_size}) (document {self.index.document_of(start + at)}, token "
            f"{start + at} of {prefix}.bin); was it tokenised with another tokenizer?")
