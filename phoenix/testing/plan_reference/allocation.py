"""The reference's allocator: per-batch counts by PD^2 on the fractional parts, the
cumulative-EDF fallback, and the burst slots (see :mod:`phoenix.data.plan`, steps 1-2)."""

from __future__ import annotations

import numpy as np

Q_BITS = 60
Q = 1 << Q_BITS          # fixed-point unit of quotas: weight 1.0 == Q
INF = 1 << 62            # "deadline beyond the horizon"


def burst_on(p: int, u: int) -> int:
    """1 if a burst dataset with rate ``p / Q`` appears in batch ``u`` (Bresenham, phase 1/2)."""
    return ((Q // 2 + (u + 1) * p) >> Q_BITS) - ((Q // 2 + u * p) >> Q_BITS)


class _Fluid:
    """Extras fluid of one blended dataset, scanned forward lazily.

    E(u) = sum_{m<u} frac(q * F_m / Q). Subtask j (the j-th extra sample) is released at
    r_j = min{u: E(u+1) > j-1}, due before d_j = min{u: E(u) >= j}; b_j = [E(d_j) > j].
    """

    def __init__(self, q: int, free):
        self.q, self.free = q, free
        self.u, self.level, self.rem = 0, 0, 0
        self.rel, self.dl, self.bbit = {}, {}, {}
        self.gd_for, self.gd_next, self.gd_val = -1, 0, None

    def step(self) -> None:
        phi = (self.q * self.free(self.u)) & (Q - 1)
        rem = self.rem + phi
        if rem >= Q:
            rem -= Q
            self.level += 1
            self.dl[self.level], self.bbit[self.level] = self.u + 1, rem > 0
            if rem > 0:
                self.rel[self.level + 1] = self.u
        elif self.rem == 0 and rem > 0:
            self.rel[self.level + 1] = self.u
        self.rem, self.u = rem, self.u + 1

    def key(self, i: int, t: int, horizon: int, heavy: bool):
        """PD^2 priority key of subtask ``i`` at batch ``t``, or None if not released."""
        while i not in self.rel and self.u <= t:
            self.step()
        if self.rel.get(i, INF) > t:
            return None
        while i not in self.dl and self.u <= t + horizon:
            self.step()
        if i not in self.dl:
            return (INF, 0, 0)
        b = self.bbit[i]
        g = self.group_deadline(i, t, horizon) if (b and heavy) else 0
        return (self.dl[i], -int(b), -g)

    def group_deadline(self, i: int, t: int, horizon: int) -> int:
        if self.gd_for != i:
            self.gd_for, self.gd_next, self.gd_val = i, i + 1, None
        if self.gd_val is not None:
            return self.gd_val
        j = self.gd_next
        while True:
            while j not in self.dl and self.u <= t + horizon:
                self.step()
            if j not in self.dl:
                self.gd_next = j
                return INF
            if self.dl[j] - self.rel[j] >= 3:
                self.gd_val = self.dl[j] - 1
                return self.gd_val
            if not self.bbit[j]:
                self.gd_val = self.dl[j]
                return self.gd_val
            j += 1


def burst_free(prep, u: int) -> int:
    """Slots of batch ``u`` not taken by bursts."""
    D = len(prep["kind"])
    return prep["global_batch_size"] - sum(
        int(prep["burst_size"][d]) * burst_on(int(prep["quota"][d]), u)
        for d in range(D) if prep["kind"][d] == 1)


def fit_limit(q: int, f: int) -> int:
    """ceil(q * f / Q) after removing the quota's rounding (see data_plan.h)."""
    return -(-max(0, q * f - f) // Q)


def _setup(prep, taken=()):
    B, K, D = prep["global_batch_size"], prep["num_batches"], len(prep["kind"])
    bursts = [(d, int(prep["quota"][d]), int(prep["burst_size"][d]))
              for d in range(D) if prep["kind"][d] == 1]
    blended = [d for d in range(D) if prep["kind"][d] == 0 and prep["quota"][d] > 0]
    q = {d: int(prep["quota"][d]) for d in blended}
    taken = list(taken)

    def free(u):   # slots left by the bursts and the flexible grouped datasets
        return (B - sum(s * burst_on(p, u) for _, p, s in bursts)
                - (taken[u] if u < len(taken) else 0))

    counts = np.zeros((K, D), dtype=np.int64)
    for t in range(K):
        for d, p, s in bursts:
            counts[t, d] = s * burst_on(p, t)
    return B, K, bursts, blended, q, free, counts


def _lag_ok(x: int, level: list, add: int) -> bool:
    """Advance E = level[0] + level[1]/Q by add/Q; True if -1 < x - E < 1."""
    level[1] += add
    level[0], level[1] = level[0] + (level[1] >> Q_BITS), level[1] & (Q - 1)
    return x == level[0] or (x == level[0] + 1 and level[1] > 0)


def allocate_pd2(prep: dict, taken=()) -> tuple[np.ndarray, int]:
    """Per-batch counts ``(K, D)`` by PD^2 on the fractional parts, and the number of
    (batch, dataset) lag violations."""
    B, K, bursts, blended, q, free, counts = _setup(prep, taken)
    heavy = {d: 2 * ((q[d] * B) & (Q - 1)) >= Q for d in blended}
    fluid = {d: _Fluid(q[d], free) for d in blended}
    extras = {d: 0 for d in blended}
    level = {d: [0, 0] for d in blended}     # E(t) as (integer part, remainder)
    violations = 0
    for t in range(K):
        ft = free(t)
        base = {d: (q[d] * ft) >> Q_BITS for d in blended}
        need = ft - sum(base.values())
        keys = []
        for d in blended:
            k = fluid[d].key(extras[d] + 1, t, prep["horizon"], heavy[d])
            if k is not None:
                keys.append(k + (d,))
        chosen = [k[-1] for k in sorted(keys)[:need]]
        if len(chosen) < need:                 # PD^2 ran out of released subtasks
            violations += 1
            chosen += [d for d in blended if d not in chosen][:need - len(chosen)]
        for d in blended:
            extras[d] += int(d in chosen)
            counts[t, d] = base[d] + int(d in chosen)
            violations += not _lag_ok(extras[d], level[d], (q[d] * ft) & (Q - 1))
    return counts, violations


def allocate_edf(prep: dict, flex_taken=()) -> tuple[np.ndarray, int]:
    """Fallback: cumulative EDF over unit jobs (sample j of d is due in the batch where
    its total fluid reaches j). Returns counts and lag violations (provably 0)."""
    B, K, bursts, blended, q, free, counts = _setup(prep, flex_taken)
    flex_cum = [0]
    for x in flex_taken:
        flex_cum.append(flex_cum[-1] + int(x))

    def cum_free(u):   # sum of F_m for m < u
        return (B * u - sum(s * ((Q // 2 + u * p) >> Q_BITS) for _, p, s in bursts)
                - flex_cum[min(u, len(flex_cum) - 1)])

    def deadline(d, j, lo):   # min u >= lo with T_d(u) >= j
        step = 1
        while q[d] * cum_free(lo + step) < j * Q:
            lo, step = lo + step, 2 * step
        hi = lo + step
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if q[d] * cum_free(mid) < j * Q else (lo, mid)
        return hi

    taken = {d: 0 for d in blended}
    violations = 0
    for t in range(K):
        total = cum_free(t + 1)
        need, cands = free(t), []
        for d in blended:
            floor, frac = divmod(q[d] * total, Q)
            must = max(0, floor - taken[d])
            need -= must
            counts[t, d] = must
            if frac and taken[d] + must == floor:
                cands.append((deadline(d, floor + 1, t + 1), d))
        chosen = [d for _, d in sorted(cands)[:max(need, 0)]]
        violations += need < 0 or len(chosen) < need
        for d in blended:
            counts[t, d] += d in chosen
            taken[d] += counts[t, d]
            floor, frac = divmod(q[d] * total, Q)
            violations += not (taken[d] == floor or (taken[d] == floor + 1 and frac > 0))
    return counts, violations


def allocate(prep: dict, flex_counts=None) -> tuple[np.ndarray, int, str]:
    """Counts, lag violations and the allocator used ("pd2", or "edf" if PD^2 failed).

    The caller's ``fixed_counts`` rows come first; the allocator plans the rest.
    ``flex_counts`` (K, D): what the flexible grouped datasets took (their columns)."""
    fixed = np.asarray(prep.get("fixed_counts", np.zeros((0, len(prep["kind"])))), dtype=np.int64)
    rest = dict(prep, num_batches=prep["num_batches"] - len(fixed))
    taken = () if flex_counts is None else flex_counts.sum(axis=1).tolist()
    counts, violations = allocate_pd2(rest, taken)
    allocator = "pd2"
    if violations:
        counts, violations = allocate_edf(rest, taken)
        allocator = "edf"
    if flex_counts is not None:
        counts = counts + flex_counts
    return np.concatenate([fixed, counts]), violations, allocator

