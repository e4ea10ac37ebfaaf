"""What the forked writer of an asynchronous save maps: only the memory it writes.

``fork()`` copies the page tables of every private page of the training process and marks
each page copy-on-write: its time grows with the process's resident memory (on CPU
training, the weights, the gradients and Adam's state: about 10 GB for 0.7B parameters),
and every page training writes while the writer lives is then copied once. The writer only
reads the shards this rank writes: a quarter of the replicated weights at DP=4, its own
optimizer shard, never a gradient.

:func:`fork_leaving_out` marks the rest of the training state's memory ``MADV_DONTFORK``
(Linux ``madvise(2)``) for the one fork that starts the writer, and ``MADV_DOFORK`` again
right after: the child gets no mapping of it (no page-table copy, no copy-on-write of the
gradients or of the weights other ranks write), the parent keeps it as it was, and a later
fork (a data-loader worker) sees everything. Pages are only left out whole: a page that
holds a byte the writer reads stays, and so does the first page of every allocation (the
allocator's header). Where ``madvise`` is refused (not Linux), the fork copies everything,
as before: the same checkpoint, only slower.

A GPU state needs none of this: megatron stages it in new host tensors, which the writer
reads, and device memory is not part of a fork.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
from typing import Iterable, Iterator

import torch

log = logging.getLogger(__name__)

_MADV_DONTFORK, _MADV_DOFORK = 10, 11  # linux/mman-common.h
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
_MIN_RANGE = 1 << 20
"""Ranges smaller than this (bytes) stay mapped: a madvise call each is not worth it."""


def _merged(ranges: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for start, end in sorted(r for r in ranges if r[1] > r[0]):
        if out and start <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], end))
        else:
            out.append((start, end))
    return out


def _storage_range(t: torch.Tensor, inward: bool) -> tuple[int, int]:
    """The page range of ``t``'s whole storage: inside it (``inward``: the pages that only
    it holds, never the allocation's first) or covering it."""
    s = t.untyped_storage()
    start, end = s.data_ptr(), s.data_ptr() + s.nbytes()
    if inward:
        return (start // _PAGE + 1) * _PAGE, end // _PAGE * _PAGE
    return start // _PAGE * _PAGE, -(-end // _PAGE) * _PAGE


def _tensor_range(t: torch.Tensor) -> tuple[int, int]:
    """The pages covering the bytes of ``t`` (contiguous or not: its first to last element)."""
    if t.numel() == 0:
        return 0, 0
    span = sum((n - 1) * abs(st) for n, st in zip(t.shape, t.stride())) + 1
    start = t.data_ptr()
    return start // _PAGE * _PAGE, -(-(start + span * t.element_size()) // _PAGE) * _PAGE


def left_out_ranges(unneeded: Iterable[torch.Tensor],
                    needed: Iterable[torch.Tensor]) -> list[tuple[int, int]]:
    """Page-aligned ``(start, end)`` address ranges of the storages of the CPU tensors
    ``unneeded`` that hold no byte of the CPU tensors ``needed`` (each at least 1 MiB;
    sorted, disjoint)."""
    keep = _merged(_tensor_range(t) for t in needed if t.device.type == "cpu")
    out, k = [], 0
    for start, end in _merged(_storage_range(t, inward=True)
                              for t in unneeded if t.device.type == "cpu"):
        while k < len(keep) and keep[k][1] <= start:
            k += 1
        j = k
        while start < end:
            if j < len(keep) and keep[j][0] < end:
                piece_end, next_start = max(keep[j][0], start), max(keep[j][1], start)
                j += 1
            else:
                piece_end = next_start = end
            if piece_end - start >= _MIN_RANGE:
                out.append((start, piece_end))
            start = next_start
    return out


def _madvise(ranges: list[tuple[int, int]], advice: int) -> int:
    """Advise every range; returns how many were advised (stops at the first refusal)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    for i, (start, end) in enumerate(ranges):
        if libc.madvise(start, end - start, advice) != 0:
            log.debug("madvise(%d) refused: %s", advice, os.strerror(ctypes.get_errno()))
            return i
    return len(ranges)


@contextlib.contextmanager
def fork_leaving_out(unneeded: Iterable[torch.Tensor],
                     needed: Iterable[torch.Tensor]) -> Iterator[int]:
    """Within the block, a ``fork()`` maps none of :func:`left_out_ranges` (``unneeded``'s
    storages less the pages of ``needed``): the child must not read them (it would die of
    SIGSEGV). Yields the bytes left out; everything is mapped into forks again after."""
    ranges = left_out_ranges(unneeded, needed)
    done = _madvise(ranges, _MADV_DONTFORK) if ranges else 0
    try:
        yield sum(end - start for start, end in ranges[:done])
    finally:
        if done:
            _madvise(ranges[:done], _MADV_DOFORK)


def training_tensors(model_chunks, optimizer) -> list[torch.Tensor]:
    """The tensors of the training state, whose storages are the memory :func:`fork_leaving_out`
    considers (the contiguous buffers the parameters and gradients are views into): the
    weights, their gradients (``main_grad``, ``grad``) and the optimizer's parameters and
    state (megatron optimizers keep torch's in ``.optimizer``; chained ones in
    ``.chained_optimizers``)."""
    out = []
    for chunk in model_chunks:
        for p in chunk.parameters():
            out += [t for t in (p, getattr(p, "main_grad", None), p.grad) if t is not None]
    for opt in getattr(optimizer, "chained_optimizers", [optimizer] if optimizer else []):
        inner = getattr(opt, "optimizer", None)
        for group in getattr(inner, "param_groups", []):
            for p in group["params"]:
                out.append(p)
                out += [v for v in inner.state.get(p, {}).values() if torch.is_tensor(v)]
    return out
