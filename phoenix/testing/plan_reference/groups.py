"""The reference's exact whole-group packer (``GroupPacker`` in csrc/data_plan.h): groups
packed into a grouped dataset's exact per-batch counts (see :mod:`phoenix.data.plan`,
"Whole groups")."""

from __future__ import annotations

import numpy as np

from phoenix.testing.plan_reference.streams import epoch_key, permutation


def subset(sizes: list[int], cap: int) -> tuple[list[int], int]:
    """Indices of a subset of ``sizes`` summing to ``cap`` if possible, else to the largest
    reachable sum; earlier items are preferred. Returns (indices, sum)."""
    mask = (1 << (cap + 1)) - 1
    reach = [0] * (len(sizes) + 1)
    reach[-1] = 1
    for i in range(len(sizes) - 1, -1, -1):
        reach[i] = (reach[i + 1] | (reach[i + 1] << sizes[i])) & mask
    target = cap if (reach[0] >> cap) & 1 else reach[0].bit_length() - 1
    take, rest = [], target
    for i, s in enumerate(sizes):
        if s <= rest and (reach[i + 1] >> (rest - s)) & 1:
            take.append(i)
            rest -= s
    return take, target


class GroupPacker:
    """Whole-group consumption of one grouped dataset (see plan.py, "Whole groups")."""

    def __init__(self, n, starts, seed, key, start, window):
        self.n, self.starts, self.seed, self.key, self.window = n, starts, seed, key, window
        self.ngroups = len(starts) - 1
        self.pending, self.partial, self.closing = [], None, False
        self.split = self.total = self.fit_total = self.fit_split = 0
        self.fit = 0                     # fit limit of the current batch (statistics only)
        self.touched = set()
        self._enter(start // n)
        target = start % n
        while self.pulled < target:
            item = self._pull()
            if self.pulled > target:
                self.partial = [item[0], item[1], item[1] - (self.pulled - target)]

    def _enter(self, epoch):
        self.epoch, self.q, self.pulled = epoch, 0, 0
        order = permutation(self.ngroups, epoch_key(self.seed, self.key, epoch),
                            np.arange(self.ngroups))
        self.order = [int(g) for g in order]

    def _pull(self):
        g = self.order[self.q]
        size = int(self.starts[g + 1] - self.starts[g])
        self.q += 1
        self.pulled += size
        return (g, size)

    def _emit(self, out, g, lo, hi):
        if lo == hi:
            return
        if lo == 0:
            self.total += 1
            self.fit_total += int(self.starts[g + 1] - self.starts[g]) <= self.fit
        self.touched.add(self.epoch)
        out.extend(range(int(self.starts[g]) + lo, int(self.starts[g]) + hi))

    def _split(self, out, item, cap):
        self._emit(out, item[0], 0, cap)
        self.partial = [item[0], item[1], cap]
        self.split += 1
        self.fit_split += item[1] <= self.fit

    def _maybe_next_epoch(self):
        if self.q == self.ngroups and not self.pending and self.partial is None:
            self._enter(self.epoch + 1)

    def _place_subset(self, out, cap):
        sizes = [s for _, s in self.pending]
        fits = [i for i, s in enumerate(sizes) if s <= cap]
        take, total = subset([sizes[i] for i in fits], cap)
        chosen = {fits[i] for i in take}
        for i in sorted(chosen):
            self._emit(out, self.pending[i][0], 0, self.pending[i][1])
        self.pending = [it for i, it in enumerate(self.pending) if i not in chosen]
        return cap - total

    def _start(self, out, count):
        cap = count
        if self.partial is not None:
            g, size, done = self.partial
            take = min(cap, size - done)
            self._emit(out, g, done, done + take)
            self.partial = None if done + take == size else [g, size, done + take]
            cap -= take
        return cap

    def _normal(self, out, count):
        cap = self._start(out, count)
        while cap > 0:
            self._maybe_next_epoch()
            while len(self.pending) < self.window and self.q < self.ngroups:
                self.pending.append(self._pull())
            if cap == count and self.pending[0][1] > count:
                self._split(out, self.pending.pop(0), cap)
                return
            cap = self._place_subset(out, cap)
            if cap > 0 and self.pending:
                self._split(out, self.pending.pop(0), cap)
                return

    def _close(self, out, count):
        cap = self._start(out, count)
        while cap > 0:
            if self.pending:
                cap = self._place_subset(out, cap)
                if cap > 0 and self.pending:
                    self._split(out, self.pending.pop(0), cap)
                    return
            else:
                self._maybe_next_epoch()
                item = self._pull()
                if item[1] <= cap:
                    self._emit(out, item[0], 0, item[1])
                    cap -= item[1]
                else:
                    self._split(out, item, cap)
                    return

    def _load(self):
        rest = self.partial[1] - self.partial[2] if self.partial else 0
        return sum(s for _, s in self.pending) + rest

    def batch(self, count, remaining_after):
        out = []
        if not self.closing:
            saved = (self.epoch, self.q, self.pulled, self.order, list(self.pending),
                     None if self.partial is None else list(self.partial), self.split,
                     self.total, set(self.touched), self.fit_total, self.fit_split)
            self._normal(out, count)
            if self._load() <= remaining_after:
                return out
            (self.epoch, self.q, self.pulled, self.order, self.pending, self.partial,
             self.split, self.total, self.touched, self.fit_total, self.fit_split) = saved
            self.closing, out = True, []
        self._close(out, count)
        return out

    def end_offset(self):
        assert not self.pending, "stage ended with out-of-order groups pending"
        rest = self.partial[1] - self.partial[2] if self.partial else 0
        return self.epoch * self.n + self.pulled - rest

