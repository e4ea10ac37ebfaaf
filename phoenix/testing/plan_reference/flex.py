"""The reference's flexible whole-group packer (``FlexPacker`` in csrc/data_plan.h), for
grouped datasets of kind 2: whole groups in stream order against a cumulative target."""

from __future__ import annotations

import numpy as np

from phoenix.testing.plan_reference.allocation import Q, Q_BITS, burst_free, fit_limit
from phoenix.testing.plan_reference.streams import epoch_key, permutation


class FlexPacker:
    """Whole groups, in stream order, against a cumulative target (see data_plan.h)."""

    def __init__(self, n, starts, seed, key, start):
        self.n, self.starts, self.seed, self.key = n, starts, seed, key
        self.ngroups = len(starts) - 1
        self.epoch, self.q, self.pulled, self.taken = start // n, 0, 0, 0
        self.partial = None                  # [group, size, done]
        self.split = self.total = self.fit_total = 0
        self.touched = set()
        self._order()
        target = start % n
        while self.pulled < target:
            g, size = self._peek()
            self.q, self.pulled = self.q + 1, self.pulled + size
            if self.pulled > target:
                self.partial = [g, size, size - (self.pulled - target)]

    def _order(self):
        self.order = permutation(self.ngroups, epoch_key(self.seed, self.key, self.epoch),
                                 np.arange(self.ngroups)).tolist()

    def _peek(self):
        g = self.order[self.q]
        return g, int(self.starts[g + 1] - self.starts[g])

    def _gap(self, tq):       # round(T - C), halves up; <= 0 when T - C < 1/2
        c = self.taken << Q_BITS
        return 0 if tq + Q // 2 < c + Q else (tq + Q // 2 - c) >> Q_BITS

    def _emit(self, out, g, lo, hi):
        if lo == hi:
            return
        self.touched.add(self.epoch)
        out.extend(range(int(self.starts[g]) + lo, int(self.starts[g]) + hi))
        self.taken += hi - lo

    def batch(self, tq, cap, fit, force):
        out = []
        if self.partial is not None:
            g, size, done = self.partial
            piece = min(max(self._gap(tq), 1 if force else 0), size - done, cap)
            self._emit(out, g, done, done + piece)
            cap -= piece
            if done + piece < size:
                self.partial[2] = done + piece
                return out
            self.partial = None
        while True:
            if self.q == self.ngroups:
                self.epoch, self.q, self.pulled = self.epoch + 1, 0, 0
                self._order()
            g, size = self._peek()
            if size <= fit:
                if (2 * self.taken + size) << Q_BITS > 2 * tq or size > cap:
                    break
                self.q, self.pulled, self.total, self.fit_total = (
                    self.q + 1, self.pulled + size, self.total + 1, self.fit_total + 1)
                self._emit(out, g, 0, size)
                cap -= size
            else:
                piece = min(self._gap(tq), size, cap)
                if piece < 1:
                    break
                self.q, self.pulled, self.total = self.q + 1, self.pulled + size, self.total + 1
                self._emit(out, g, 0, piece)
                cap -= piece
                if piece < size:
                    self.split += 1
                    self.partial = [g, size, piece]
                    break
        return out

    def end_offset(self):
        rest = self.partial[1] - self.partial[2] if self.partial else 0
        return self.epoch * self.n + self.pulled - rest


def pack_flexible(prep: dict, per_batch, stats) -> np.ndarray:
    """Run the flexible grouped datasets in order; (K, D) counts of their columns."""
    K, D = prep["num_batches"], len(prep["kind"])
    flex = np.zeros((K, D), dtype=np.int64)
    for d in range(D):
        if prep["kind"][d] != 2:
            continue
        q = int(prep["quota"][d])
        packer = FlexPacker(int(prep["num_samples"][d]), prep["group_starts"][d], prep["seed"],
                            int(prep["keys"][d]), int(prep["start"][d]))
        cum = 0
        for k in range(K):
            f = burst_free(prep, k)
            cum += f
            out = packer.batch(q * cum, f - int(flex[k].sum()), fit_limit(q, f), q * f >= Q)
            per_batch[k][d] = np.array(out, dtype=np.int64)
            flex[k, d] = len(out)
        stats[d] = (packer.end_offset(), len(packer.touched), packer.split, packer.total,
                    packer.fit_total, 0)
    return flex
