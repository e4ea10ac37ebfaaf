"""Straightforward Python/numpy reference of the data-plan builder (used by tests only).

It implements the algorithm documented in :mod:`phoenix.data.plan` step by step, with
Python integers for all exact arithmetic, so that tests can check that the C++ builder
(``csrc/data_plan.cpp``) produces bit-identical plans. It is slow; keep inputs small.
Inputs are the *prepared* integers of :func:`phoenix.data.plan.prepare`.
"""

from __future__ import annotations

import math

import numpy as np

Q_BITS = 60
Q = 1 << Q_BITS          # fixed-point unit of quotas: weight 1.0 == Q
M64 = (1 << 64) - 1
INF = 1 << 62            # "deadline beyond the horizon"


# ----------------------------------------------------------------------------- PRNG
def mix64(z: int) -> int:
    """splitmix64 finaliser (bijective 64-bit mix)."""
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
    return z ^ (z >> 31)


def splitmix64(state: int, n: int) -> list[int]:
    """The next ``n`` outputs of a splitmix64 generator started at ``state``."""
    out = []
    for _ in range(n):
        state = (state + 0x9E3779B97F4A7C15) & M64
        out.append(mix64(state))
    return out


def epoch_key(seed: int, key: int, epoch: int) -> int:
    return mix64(mix64(mix64(seed & M64) ^ key) ^ epoch)


SMALL_PERM = 1 << 16


def permutation(n: int, key: int, x: np.ndarray) -> np.ndarray:
    """Image of positions ``x`` under the epoch permutation of ``range(n)`` (n >= 1):
    Fisher-Yates up to SMALL_PERM elements, the Feistel network beyond."""
    if n > SMALL_PERM:
        return feistel(n, key, x)
    perm = list(range(n))
    for i, v in zip(range(n - 1, 0, -1), splitmix64(key, n - 1)):
        j = (v * (i + 1)) >> 64
        perm[i], perm[j] = perm[j], perm[i]
    return np.array(perm, dtype=np.int64)[np.asarray(x, dtype=np.int64)]


def feistel(n: int, key: int, x: np.ndarray) -> np.ndarray:
    """Image of positions ``x`` under the epoch permutation of ``range(n)`` (n >= 1):
    4 Feistel rounds on [0, a) x [0, b), a = ceil(sqrt(n)), b = ceil(n / a)."""
    a = math.isqrt(n - 1) + 1
    b = -(-n // a)
    vals = iter(splitmix64(key, 2 * (a + b)))
    tabs = [np.array([(next(vals) * mod) >> 64 for _ in range(size)], dtype=np.int64)
            for size, mod in ((b, a), (a, b), (b, a), (a, b))]

    def once(v):
        left, right = v // b, v % b
        left = (left + tabs[0][right]) % a
        right = (right + tabs[1][left]) % b
        left = (left + tabs[2][right]) % a
        right = (right + tabs[3][left]) % b
        return left * b + right

    y = once(np.asarray(x, dtype=np.int64).copy())
    while (bad := y >= n).any():  # cycle walking keeps the map a bijection of range(n)
        y[bad] = once(y[bad])
    return y


# ----------------------------------------------------------------------- allocation
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


# ----------------------------------------------------------------------- consumption
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


def consume_plain(n, seed, key, start, total):
    """Sample ids of stream positions [start, start + total) of an ungrouped dataset."""
    pos = np.arange(start, start + total, dtype=np.int64)
    out = np.empty(total, dtype=np.int64)
    for e in np.unique(pos // n) if total else []:
        m = pos // n == e
        out[m] = permutation(n, epoch_key(seed, key, int(e)), pos[m] % n)
    epochs = len(np.unique(pos // n)) if total else 0
    return out, epochs


def interleave_positions(B: int, interleave: bool) -> np.ndarray:
    """Output position of the j-th source sample of a batch (see plan.py, "Interleave")."""
    if not interleave:
        return np.arange(B, dtype=np.int64)
    a = (B & -B).bit_length() - 1
    m = B >> a
    s = (m * 5) // 8
    while np.gcd(s, m) != 1:
        s += 1
    pos = np.empty(B, dtype=np.int64)
    for j in range(B):
        low, high = j & ((1 << a) - 1), j >> a
        rev = int(format(low, f"0{a}b")[::-1], 2) if a else 0
        if low & 1:
            rev ^= (1 << (a - 1)) - 1
        pos[j] = rev * m + (high * s) % m
    return pos


def build(prep: dict) -> dict:
    """The whole plan from prepared inputs (same dict layout as the C++ builder returns)."""
    B, K = prep["global_batch_size"], prep["num_batches"]
    D = len(prep["kind"])
    per_batch = [[None] * D for _ in range(K)]
    stats = {}
    from phoenix.testing.plan_reference_flex import pack_flexible   # imports this module
    flex = pack_flexible(prep, per_batch, stats) if 2 in list(prep["kind"]) else None
    counts, violations, allocator = allocate(prep, flex)
    remaining = np.cumsum(counts[::-1], axis=0)[::-1] - counts   # samples after batch k
    end, epochs = np.zeros(D, np.int64), np.zeros(D, np.int64)
    split, total = np.zeros(D, np.int64), np.zeros(D, np.int64)
    fit, fit_split = np.zeros(D, np.int64), np.zeros(D, np.int64)
    K0 = len(prep.get("fixed_counts", ()))
    for d in range(D):
        n, key, start = int(prep["num_samples"][d]), int(prep["keys"][d]), int(prep["start"][d])
        starts = prep["group_starts"][d]
        if prep["kind"][d] == 2:
            end[d], epochs[d], split[d], total[d], fit[d], fit_split[d] = stats[d]
            if not counts[:, d].sum():
                end[d], epochs[d] = start, 0
            continue
        if starts is None:
            ids, epochs[d] = consume_plain(n, prep["seed"], key, start, int(counts[:, d].sum()))
            cut = np.cumsum(counts[:, d])[:-1]
            for k, part in enumerate(np.split(ids, cut) if K else []):
                per_batch[k][d] = part
            end[d] = start + counts[:, d].sum()
            continue
        packer = GroupPacker(n, starts, prep["seed"], key, start, prep["window"])
        for k in range(K):
            packer.fit = (int(counts[k, d]) if k < K0 else
                          fit_limit(int(prep["quota"][d]), burst_free(prep, k - K0)))
            per_batch[k][d] = np.array(packer.batch(int(counts[k, d]), int(remaining[k, d])),
                                       dtype=np.int64)
        end[d], epochs[d] = packer.end_offset(), len(packer.touched)
        split[d], total[d] = packer.split, packer.total
        fit[d], fit_split[d] = packer.fit_total, packer.fit_split
    pos = interleave_positions(B, prep["interleave"])
    dataset_ids = np.zeros(K * B, dtype=np.uint16)
    sample_ids = np.zeros(K * B, dtype=np.int64)
    for k in range(K):
        src_d = np.concatenate([np.full(counts[k, d], d) for d in range(D)])
        src_s = np.concatenate([per_batch[k][d] for d in range(D)])
        dataset_ids[k * B + pos] = src_d
        sample_ids[k * B + pos] = src_s
    return dict(dataset_ids=dataset_ids, sample_ids=sample_ids, counts=counts.astype(np.int32),
                end_offsets=end, epochs=epochs, groups_split=split, groups_total=total,
                groups_fit=fit, groups_fit_split=fit_split, violations=violations, allocator=allocator)
