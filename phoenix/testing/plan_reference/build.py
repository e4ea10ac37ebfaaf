"""The whole plan from prepared inputs: flexible groups, counts, consumption, interleave."""

from __future__ import annotations

import numpy as np

from phoenix.testing.plan_reference.allocation import allocate, burst_free, fit_limit
from phoenix.testing.plan_reference.flex import pack_flexible
from phoenix.testing.plan_reference.groups import GroupPacker
from phoenix.testing.plan_reference.streams import consume_plain


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
