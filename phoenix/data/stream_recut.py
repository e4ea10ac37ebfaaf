"""Continuing a dataset's epoch when its samples are cut anew (another ``seq_length``).

A dataset's stream is its epoch-permuted sample order for one cut, ``(seq_length,
grouped)`` (:mod:`phoenix.data.stage_plans`). When a stage, or a resume that changes the
data, reads a dataset with another cut in the middle of an epoch, the samples read so
far are a random subset of the old cut's samples, so no offset in the new cut's stream
continues it: every offset re-reads some tokens of the epoch and skips others. This
module makes the change exact instead:

* **Ungrouped to ungrouped** (a new ``seq_length``): the tokens of the old stream not yet
  read in the current epoch (the unread runs of consecutive old samples, in file order,
  joined into one stream) are cut at the new length: the *remainder* of ``R`` samples.
  The new stream's current epoch ``e`` holds just them, in a seeded order, at stream
  positions ``[e*N + N - R, (e+1)*N)`` (``N``: samples of the new cut); epoch ``e + 1``
  on are whole epochs of the new cut. So before the epoch ends no token is read twice
  and none is skipped. A remainder sample may join the end of one unread run and the
  start of the next (two places of the file), like a ``min_document_tokens`` view joins
  two kept documents. The remainder's samples get ids ``N..N+R-1`` of a *continued*
  sample index (:func:`continued_index`), and :func:`apply_head` gives the plan those ids.
* **Grouped to grouped** without ``pack_groups``: the group order of an epoch depends on
  the groups only, not on the cut, so a stream stopped between two groups continues at
  the same group of the new cut's stream (:func:`grouped_offset`).
* **A new seed** (a stage's ``data_seed``), same cut: the samples of the current epoch
  not yet read under the old seed's permutation are read next, in the new seed's order
  (a permutation of just them, :class:`StreamHead` with ``from_seed``), at the same stream
  positions; epoch ``e + 1`` on are the new seed's permutations. Together with a new
  ``seq_length`` (ungrouped), the remainder is the re-cut one above, found under the
  old seed and ordered by the new one. Whole-group streams are never reseeded (the
  stage table refuses it).
* At an epoch boundary every change is exact (the new stream starts its next epoch).

Other changes (grouped <-> ungrouped, ``pack_groups`` with a new length, a grouped stream
stopped inside a group, a second re-cut or reseed inside the epoch of a first) have no exact
continuation: :func:`continuation` returns None and the caller decides (a stage starts
the new stream at the same fraction of an epoch with a warning; a resume is refused).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Optional

import numpy as np

from phoenix.data.native import group_runs, plan_cpp
from phoenix.data.samples import DocumentView, SampleIndex, cut_range

HEAD_SALT = 0x7265637574  # keys the remainder's order apart from the epoch's own permutation
RESEED_SALT = 0x7265736565  # keys a reseeded remainder's order apart from both
_CHUNK = 1 << 22          # positions permuted per call (bounded temporary memory)

Cursor = tuple[int, bool, int, int]  # (seq_length, grouped, stream offset, samples in the cut)


@dataclass(frozen=True)
class StreamHead:
    """The current epoch of a re-cut or reseeded stream: ``count`` remainder samples at the
    end of epoch ``epoch``: ids ``n..n+count-1`` of the continued index (``n`` the cut's
    size) for a re-cut; with ``from_seed``, the samples that ``from_seed``'s permutation
    of that epoch puts at its last ``count`` positions (a reseed of the same cut)."""

    epoch: int
    count: int
    from_seed: Optional[int] = None

    def key(self) -> list[int]:
        """For plan fingerprints (a re-cut head's is the one it always had)."""
        return [self.epoch, self.count] + ([self.from_seed] if self.from_seed is not None else [])


def dataset_key(name: str) -> int:
    """The plan's per-dataset stream key (as :func:`phoenix.data.plan.prepare` derives it)."""
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "little")


def _permuted(n: int, seed: int, key: int, epoch: int, positions: np.ndarray) -> np.ndarray:
    out = np.empty(len(positions), dtype=np.int64)
    for i in range(0, len(positions), _CHUNK):
        out[i:i + _CHUNK] = plan_cpp().permutation(n, seed, key, epoch,
                                                   np.ascontiguousarray(positions[i:i + _CHUNK]))
    return out


def unread_runs(old: SampleIndex, position: int, epoch: int, seed: int, name: str
                ) -> tuple[np.ndarray, np.ndarray]:
    """(begins, ends) int64 of the token ranges of ``old``'s stream (view coordinates) that
    no input position of the first ``position`` samples of epoch ``epoch`` covered, in file
    order. A sample's inputs are its first ``seq_length`` tokens (its last one is a label)."""
    n = len(old)
    read = np.zeros(n, dtype=bool)
    key = dataset_key(name)
    for i in range(0, position, _CHUNK):
        read[_permuted(n, seed, key, epoch, np.arange(i, min(position, i + _CHUNK)))] = True
    unread = np.flatnonzero(~read)
    if len(unread) == 0:
        return np.empty(0, np.int64), np.empty(0, np.int64)
    # runs of consecutive unread samples
    cut = np.flatnonzero(np.diff(unread) != 1) + 1
    first = unread[np.concatenate([[0], cut])]
    last = unread[np.concatenate([cut - 1, [len(unread) - 1]])]
    starts = np.asarray(old.starts, dtype=np.int64)
    ends = starts[last] + np.asarray(old.lengths, dtype=np.int64)[last] - 1  # inputs only
    return starts[first], ends


def _bin_pieces(view: Optional[DocumentView], begin: int, end: int) -> list[tuple[int, int, int]]:
    """``[begin, end)`` of a stream (view coordinates) as ``(bin_start, length, document)``
    pieces of the ``.bin``."""
    if view is None:
        return [(begin, end - begin, -1)]
    out, k = [], int(np.searchsorted(view.starts, begin, side="right") - 1)
    while begin < end:
        take = min(end, int(view.starts[k + 1])) - begin
        out.append((int(view.bin_starts[k]) + begin - int(view.starts[k]), take, int(view.documents[k])))
        begin, k = begin + take, k + 1
    return out


def continued_index(new: SampleIndex, begins: np.ndarray, ends: np.ndarray, total: int
                    ) -> tuple[SampleIndex, int]:
    """``new`` (ids ``0..N-1``) followed by the remainder: the ranges ``[begins, ends)`` of
    the stream joined and cut at ``new.seq_length`` (ids ``N..N+R-1``). ``total``: tokens
    in the stream; the last range takes one more token as its last label when it ends
    before ``total``, so every token of the ranges is an input once. Returns (index, R)."""
    base = new.view
    base_end = int(base.starts[-1]) if base is not None else total
    pieces = [(0, base_end, -1)] if base is None else [
        (int(b), int(e - s), int(doc)) for s, e, b, doc in
        zip(base.starts[:-1], base.starts[1:], base.bin_starts, base.documents)]
    extra = np.zeros(len(begins), dtype=np.int64)
    if len(ends) and ends[-1] < total:
        extra[-1] = 1
    for b, e in zip(begins.tolist(), (ends + extra).tolist()):
        pieces += _bin_pieces(base, b, e)
    bins = np.array([p[0] for p in pieces], dtype=np.int64)
    lengths = np.array([p[1] for p in pieces], dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(lengths)])
    view = DocumentView(0 if base is None else base.min_document_tokens,
                        np.array([p[2] for p in pieces], dtype=np.int64), starts, bins)
    head_starts, head_lengths = cut_range(base_end, int(starts[-1]), new.seq_length)
    index = SampleIndex(new.prefix, new.seq_length,
                        np.concatenate([np.asarray(new.starts, dtype=np.int64), head_starts]),
                        np.concatenate([np.asarray(new.lengths, dtype=np.int32), head_lengths]),
                        None, new.doc_starts, view)
    return index, len(head_starts)


def grouped_offset(old: SampleIndex, new: SampleIndex, position: int, epoch: int, seed: int,
                   name: str) -> Optional[int]:
    """The position in ``new``'s epoch (grouped, same groups) that continues ``old`` stopped
    after ``position`` samples of epoch ``epoch``; None when it stopped inside a group or
    the two cuts do not have the same groups."""
    runs0, _ = group_runs(np.asarray(old.group_ids))
    runs1, _ = group_runs(np.asarray(new.group_ids))
    if len(runs0) != len(runs1) or not np.array_equal(np.asarray(old.group_ids)[runs0[:-1]],
                                                      np.asarray(new.group_ids)[runs1[:-1]]):
        return None
    order = _permuted(len(runs0) - 1, seed, dataset_key(name), epoch, np.arange(len(runs0) - 1))
    done0 = np.concatenate([[0], np.cumsum(np.diff(runs0)[order])])
    q = int(np.searchsorted(done0, position))
    if q >= len(done0) or done0[q] != position:
        return None
    return int(np.sum(np.diff(runs1)[order[:q]], dtype=np.int64))


def continuation(old: SampleIndex, old_cursor: Cursor, new: SampleIndex, grouped: bool,
                 packed: bool, seed: int, name: str, old_seed: Optional[int] = None
                 ) -> Optional[tuple[int, Optional[StreamHead], SampleIndex]]:
    """How ``new`` (a cut of the same dataset, read with ``seed``) continues ``old`` (read
    with ``old_seed``, default ``seed``) at ``old_cursor``: (start offset in ``new``'s
    stream, its head or None, the index the plan reads), or None when no exact
    continuation exists (see the module doc)."""
    old_seed = seed if old_seed is None else old_seed
    seq0, grouped0, offset, n0 = old_cursor
    epoch, position = divmod(offset, n0)
    n1 = len(new)
    if position == 0:
        return epoch * n1, None, new
    if grouped0 != grouped or packed or grouped and old_seed != seed:
        return None
    if grouped:
        at = grouped_offset(old, new, position, epoch, seed, name)
        return None if at is None else (epoch * n1 + at, None, new)
    if seq0 == new.seq_length and old_seed != seed:  # the same cut in a new order
        return offset, StreamHead(epoch, n0 - position, from_seed=old_seed), new
    total = int(old.starts[-1]) + int(old.lengths[-1])
    begins, ends = unread_runs(old, position, epoch, old_seed, name)
    index, count = continued_index(new, begins, ends, total)
    if count == 0:   # nothing left unread in this epoch
        return (epoch + 1) * n1, None, new
    return epoch * n1 + n1 - count, StreamHead(epoch, count), index


def head_sample_ids(n: int, head: Optional[StreamHead], start: int, count: int, seed: int,
                    name: str) -> np.ndarray:
    """Sample ids of stream positions ``start..start+count-1`` of a stream of ``n`` samples
    per epoch permuted with ``seed``, whose epoch ``head.epoch`` (if any) ends with a
    remainder: a re-cut's positions map to ids ``n + (seeded order of the remainder)``, a
    reseed's to the unread samples of ``head.from_seed``'s permutation in ``seed``'s order;
    the other epochs' to their permutation."""
    p = start + np.arange(count, dtype=np.int64)
    ids = np.empty(count, dtype=np.int64)
    key = dataset_key(name)
    epochs = p // n
    for e in np.unique(epochs).tolist():
        sel = epochs == e
        pos = p[sel] - e * n
        if head is not None and e == head.epoch:
            r = pos - (n - head.count)
            if r.min() < 0:
                raise ValueError(f"dataset '{name}': stream position {int(p[sel][0])} lies before "
                                 f"its remainder (bug)")
            if head.from_seed is None:
                ids[sel] = n + _permuted(head.count, seed, key ^ HEAD_SALT, e, r)
            else:  # the unread samples in file order, then in the new seed's order
                unread = np.sort(_permuted(n, head.from_seed, key, e,
                                           np.arange(n - head.count, n, dtype=np.int64)))
                ids[sel] = unread[_permuted(head.count, seed, key ^ RESEED_SALT, e, r)]
        else:
            ids[sel] = _permuted(n, seed, key, e, pos)
    return ids


def apply_head(dataset_ids: np.ndarray, sample_ids: np.ndarray, d: int, n: int,
               head: Optional[StreamHead], start: int, seed: int, name: str) -> None:
    """Give dataset ``d``'s samples of a built plan (in place) the ids of its stream
    permuted with ``seed``, with ``head`` (or none). The plan's ``k``-th sample of ``d`` (flat order) is stream position
    ``start + k``: a batch holds a run of consecutive positions."""
    where = np.flatnonzero(dataset_ids == d)
    if len(where):
        sample_ids[where] = head_sample_ids(n, head, start, len(where), seed, name)
