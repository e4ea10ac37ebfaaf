"""phoenix.checkpoint.writer_memory: the forked writer maps only the pages it reads.

The ranges left out are checked against a page-by-page oracle; the fork itself with real
children: one reads what it needs, one that reads a left-out page dies of SIGSEGV (the page
is really not mapped), and after the block a child sees everything again. That an
asynchronous save under it writes what a synchronous save writes is
tests/checkpoint/test_async_save.py."""

import faulthandler
import os
import random
import signal

import numpy as np
import torch

from phoenix.checkpoint.writer_memory import fork_leaving_out, left_out_ranges

PAGE = os.sysconf("SC_PAGE_SIZE")
MIB = 1 << 20


def _oracle(unneeded, needed) -> list[tuple[int, int]]:
    """Page by page: the pages wholly inside an unneeded storage but not its first, that
    hold no byte of a needed tensor; runs of them of at least 1 MiB."""
    pages = set()
    for t in unneeded:
        s = t.untyped_storage()
        first = s.data_ptr() // PAGE
        pages |= {p for p in range(first + 1, (s.data_ptr() + s.nbytes()) // PAGE)}
    for t in needed:
        lo = t.data_ptr()
        hi = lo + (t.numel() - 1) * t.stride(0) * t.element_size() + t.element_size()
        pages -= set(range(lo // PAGE, (hi - 1) // PAGE + 1))
    runs, start = [], None
    for p in sorted(pages) + [None]:
        if start is not None and (p is None or p != prev + 1):
            if (prev + 1 - start) * PAGE >= MIB:
                runs.append((start * PAGE, (prev + 1) * PAGE))
            start = None
        if p is not None and start is None:
            start = p
        prev = p
    return runs


def test_left_out_ranges_equal_a_page_by_page_oracle():
    rng = random.Random(0)
    for _ in range(20):
        unneeded = [torch.empty(rng.randrange(1, 4 * MIB)) for _ in range(rng.randrange(1, 4))]
        needed = []
        for t in unneeded:
            for _ in range(rng.randrange(0, 4)):
                a = rng.randrange(t.numel())
                b = min(t.numel(), a + rng.randrange(1, MIB))
                needed.append(t[a:b:rng.choice([1, 1, 3])])
        views = unneeded + [u[: u.numel() // 2] for u in unneeded]  # a view: its whole storage
        assert left_out_ranges(views, needed) == _oracle(unneeded, needed)


def _child_reads(t: torch.Tensor, index: int) -> int:
    """Fork a child that reads element ``index`` of ``t`` (numpy: no thread pool in the
    child) and exits 0 when it equals ``index``; returns its wait status."""
    pid = os.fork()
    if pid == 0:
        faulthandler.disable()  # a SIGSEGV is expected: no traceback dump
        ok = float(t.numpy()[index]) == float(index)
        os._exit(0 if ok else 3)
    return os.waitpid(pid, 0)[1]


def test_a_fork_inside_maps_only_the_needed_pages():
    big = torch.from_numpy(np.arange(8 * MIB, dtype=np.float32))  # 32 MiB, its own mapping
    needed = big[3 * MIB: 4 * MIB]
    far = 6 * MIB  # an element in a page no needed byte is in
    with fork_leaving_out([big], [needed]) as left_out:
        assert left_out >= 20 * MIB
        assert os.waitstatus_to_exitcode(_child_reads(big, 3 * MIB + 5)) == 0
        status = _child_reads(big, far)
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGSEGV
        assert float(big[far]) == far  # the training process keeps all of it
    assert os.waitstatus_to_exitcode(_child_reads(big, far)) == 0  # mapped into forks again
