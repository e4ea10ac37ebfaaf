"""Tests of the group-aware blended data plan (phoenix.data.plan, csrc/data_plan.cpp).

Every guarantee is checked against quantities recomputed here from the inputs (float
weights, group ids, sample ids), never against numbers the builder reports about itself;
the C++ builder is additionally compared bit for bit with the Python reference.
"""

from __future__ import annotations

import logging
import os
import warnings

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from phoenix.data import plan as P
from phoenix.data.plan_io import load_plan, save_plan
from phoenix.testing import plan_reference as R

# No importorskip: a missing or broken extension must fail the suite, not skip it.
from phoenix.data import _plan_cpp  # noqa: E402

HYP = settings(max_examples=int(os.environ.get("PLAN_TEST_EXAMPLES", 25)), deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
ARRAYS = ("dataset_ids", "sample_ids", "counts", "end_offsets", "epochs", "groups_split", "groups_total",
          "groups_fit", "groups_fit_split")


# ------------------------------------------------------------------------- helpers
def groups_of(sizes) -> np.ndarray:
    """Per-sample group ids for consecutive groups of the given sizes."""
    return np.repeat(np.arange(len(sizes)), sizes)


def ds(name, n, w, min_share=0.0, sizes=None):
    gid = None if sizes is None else groups_of(sizes)
    return P.PlanDataset(name, int(n if sizes is None else len(gid)), float(w), float(min_share),
                         "none" if sizes is None else "batch", gid)


def random_inputs(rng: np.random.Generator, max_k: int = 50) -> P.PlanInputs:
    """Small random stage: groups, bursts, zero weights, start offsets, interleave."""
    D = int(rng.integers(1, 6))
    B = int(rng.integers(max(D, 2), 40))
    datasets = []
    for d in range(D):
        n = int(rng.integers(1, 200))
        w = float(rng.random()) if rng.random() > 0.1 else 0.0
        sizes = rng.integers(1, 6, size=n)[: max(1, n // 3)] if rng.random() < 0.4 else None
        ms = float(rng.uniform(0.05, 0.4)) if rng.random() < 0.3 else 0.0
        datasets.append(ds(f"d{d}", n, w, ms, sizes))
    if all(d.weight == 0 for d in datasets):
        datasets[0].weight = 1.0
    start = [int(rng.integers(0, 3 * d.num_samples)) for d in datasets]
    return P.PlanInputs(datasets, B, int(rng.integers(0, max_k)), int(rng.integers(0, 2**63)),
                        start, bool(rng.random() < 0.8))


def targets(plan: P.DataPlan) -> np.ndarray:
    """Fluid per-batch targets (K, D) from the float weights: F_k * w_d / W_free for the
    non-burst datasets (F_k = slots not taken by bursts, recomputed from the counts); with
    flexible grouped datasets, the others' target is their share of the slots left,
    (F_k - flexible counts) * w_d / W_others."""
    burst, flex = plan.burst, plan.flexible
    free = plan.global_batch_size - plan.counts[:, burst].sum(axis=1)
    w = np.asarray(plan.weights, dtype=np.float64)
    t = free[:, None] * (w / w[~burst].sum())[None, :]
    if flex.any():
        left = free - plan.counts[:, flex].sum(axis=1)
        others = ~burst & ~flex
        t[:, others] = left[:, None] * (w[others] / w[others].sum())[None, :]
    t[:, burst] = np.nan
    return t


def consumed(plan: P.DataPlan, d: int) -> np.ndarray:
    """Dataset d's samples in consumption order (requires interleave=False)."""
    return plan.sample_ids[plan.dataset_ids == d]


def batch_of_sample(plan: P.DataPlan, d: int) -> tuple[np.ndarray, np.ndarray]:
    """(sample ids, global batch index) of dataset d's planned samples."""
    where = np.flatnonzero(plan.dataset_ids == d)
    return plan.sample_ids[where], where // plan.global_batch_size


def assert_prefix_bound(plan: P.DataPlan, tol: float = 1e-6) -> None:
    """|prefix count - prefix target| <= 1 for every non-burst, non-flexible dataset."""
    t = targets(plan)
    keep = ~plan.burst & ~plan.flexible
    lag = np.cumsum(plan.counts[:, keep] - t[:, keep], axis=0)
    assert np.abs(lag).max(initial=0) <= 1 + tol, np.abs(lag).max()


# -------------------------------------------------------------- C++ == reference
def _cpp(prep: dict) -> dict:
    return _plan_cpp.build(prep["num_samples"], prep["keys"], prep["kind"], prep["quota"],
                           prep["burst_size"], prep["start"], prep["group_starts"],
                           prep["global_batch_size"], prep["num_batches"], prep["seed"],
                           prep["interleave"], prep["horizon"], prep["window"], 2,
                           prep["fixed_counts"])


def _assert_same(prep: dict) -> dict:
    ref, out = R.build(prep), _cpp(prep)
    for key in ARRAYS:
        np.testing.assert_array_equal(np.asarray(ref[key]), np.asarray(out[key]), err_msg=key)
    assert (ref["violations"], ref["allocator"]) == (out["violations"], out["allocator"])
    assert ref["violations"] == 0
    return out


def test_cpp_matches_reference_on_random_inputs():
    rng = np.random.default_rng(20240611)
    built = 0
    for _ in range(70):
        inputs = random_inputs(rng)
        try:
            prep = P.prepare(inputs, horizon=int(rng.choice([3, 64, P.HORIZON])),
                             window=int(rng.choice([2, P.GROUP_WINDOW])))
        except ValueError:
            continue
        _assert_same(prep)
        built += 1
    assert built >= 50


@pytest.mark.parametrize("seed,B,K,w,ms,grouped", [
    (74211, 11, 121, [8, 7, 7, 7, 8, 8], [0.2, 0, 0, 0, 0, 0], False),
    (79573, 10, 107, [5, 6, 6, 3, 7, 7], [0.2, 0, 0, 0, 0, 0], False),
    (5248, 15, 143, [8, 8, 4, 7, 2, 2], [0.2, 0.2, 0, 0, 0, 0], True),
    (87358, 13, 134, [8, 8, 5, 8, 6, 3], [0.2, 0.2, 0, 0, 0, 0], True),
])
def test_edf_fallback_matches_reference_and_keeps_bound(seed, B, K, w, ms, grouped):
    # Configurations where PD^2 runs out of released subtasks (found by search): bursts,
    # and a flexible grouped dataset whose counts vary the slots left to the others.
    datasets = [ds(f"d{i}", 50, w[i], ms[i], [2] * 25 if i == 2 and grouped else None) for i in range(6)]
    inputs = P.PlanInputs(datasets, B, K, seed)
    out = _assert_same(P.prepare(inputs))
    assert out["allocator"] == "edf"
    plan = P.build_plan(inputs)
    assert plan.allocator == "edf" and plan.flexible[2] == grouped
    assert_prefix_bound(plan)
    t = targets(plan)
    keep = ~plan.flexible
    assert np.nanmax(np.abs(plan.counts - t)[:, keep]) < 2


def test_permutation_is_a_bijection_matching_the_reference():
    for n in (1, 2, 3, 7, 64, 1000, R.SMALL_PERM, R.SMALL_PERM + 1, 100_003):
        x = np.arange(n, dtype=np.int64)
        y = _plan_cpp.permutation(n, 5, 11, 3, x)
        assert np.array_equal(np.sort(y), x)
        np.testing.assert_array_equal(y, R.permutation(n, R.epoch_key(5, 11, 3), x))
    y = _plan_cpp.permutation(100_000, 1, 2, 0, np.arange(100_000))
    assert abs(np.corrcoef(np.arange(100_000), y)[0, 1]) < 0.02      # no order kept
    assert abs(np.corrcoef(y[:-1], y[1:])[0, 1]) < 0.02               # neighbours unrelated
    other = _plan_cpp.permutation(100_000, 1, 2, 1, np.arange(100_000))
    assert (y == other).mean() < 0.01                                  # fresh per epoch


# ------------------------------------------------------------ 1. exact mixture
@HYP
@given(st.lists(st.floats(0.01, 10), min_size=1, max_size=9), st.integers(1, 300),
       st.integers(1, 80), st.integers(0, 2**32))
def test_exact_mixture_without_bursts(weights, B, K, seed):
    plan = P.build_plan(P.PlanInputs([ds(f"d{i}", 500, w) for i, w in enumerate(weights)], B, K, seed))
    w = np.asarray(weights) / sum(weights)
    assert (plan.counts.sum(axis=1) == B).all()
    lag = np.cumsum(plan.counts - w * B, axis=0)
    assert np.abs(lag).max() <= 1 + 1e-6
    # PD^2 also keeps every batch at floor or ceil of its target.
    assert np.abs(plan.counts - w * B).max() < 1 + 1e-9
    assert plan.allocator == "pd2"
    # The index holds what the counts say.
    for k in (0, K - 1):
        ids, _ = plan.batch(k)
        assert np.array_equal(np.bincount(ids, minlength=len(weights)), plan.counts[k])


@HYP
@given(st.integers(2, 7), st.integers(16, 200), st.integers(20, 150), st.integers(0, 2**32),
       st.data())
def test_bursts_are_evenly_spaced_and_others_fill_exactly(D, B, K, seed, data):
    weights = [data.draw(st.floats(0.2, 5)) for _ in range(D)]
    small = data.draw(st.floats(0.001, 0.05))
    min_share = data.draw(st.floats(0.12, 0.35))     # > the rare weight (<= 0.05 / 0.45)
    datasets = [ds(f"d{i}", 300, w) for i, w in enumerate(weights)]
    datasets.append(ds("rare", 300, small, min_share))
    plan = P.build_plan(P.PlanInputs(datasets, B, K, seed))
    w_rare = small / (sum(weights) + small)
    size = max(int(np.floor(min_share * B + 0.5)), int(np.ceil(w_rare * B - 1e-12)))
    col = plan.counts[:, -1]
    assert plan.burst[-1] and not plan.burst[:-1].any()
    assert set(np.unique(col)) <= {0, size}
    present = np.flatnonzero(col)
    assert abs(len(present) - K * w_rare * B / size) <= 0.5 + 1e-9
    gaps = np.diff(present)
    assert len(gaps) == 0 or gaps.max() - gaps.min() <= 1             # Bresenham spacing
    assert (plan.counts.sum(axis=1) == B).all()
    assert_prefix_bound(plan)


def test_min_share_dataset_with_enough_weight_is_not_a_burst():
    plan = P.build_plan(P.PlanInputs([ds("a", 100, 0.7), ds("b", 100, 0.3, min_share=0.2)], 20, 30, 1))
    assert not plan.burst.any() and (plan.counts[:, 1] == 6).all()


def test_stress_random_bursts_keep_prefix_bound():
    rng = np.random.default_rng(7)
    for it in range(60):
        D = int(rng.integers(3, 12))
        w = rng.random(D) + 0.05
        ms = np.zeros(D)
        for b in range(int(rng.integers(1, 3))):
            ms[b] = min(0.9, w[b] / w.sum() * rng.uniform(1.5, 12))
        datasets = [ds(f"d{i}", 10**5, w[i], ms[i]) for i in range(D)]
        try:
            plan = P.build_plan(P.PlanInputs(datasets, int(rng.integers(D + 8, 300)), 400, it))
        except ValueError:
            continue
        assert (plan.counts.sum(axis=1) == plan.global_batch_size).all()
        assert_prefix_bound(plan)


# --------------------------------------------------------------- 3. whole groups
def group_occurrences(plan: P.DataPlan, d: int, gid: np.ndarray, sizes) -> list[tuple[int, np.ndarray]]:
    """(group, batches of its samples) for every consumption of a group by dataset d, from
    the consumption order (interleave=False keeps each group occurrence contiguous)."""
    seq, batch = consumed(plan, d), batch_of_sample(plan, d)[1]
    groups = gid[seq]
    cuts = np.flatnonzero(groups[1:] != groups[:-1]) + 1
    out = []
    for run in np.split(np.arange(len(seq)), cuts):
        g = int(groups[run[0]])
        out += [(g, batch[part]) for part in np.split(run, range(sizes[g], len(run), sizes[g]))]
    return out


def test_groups_stay_whole_in_one_batch():
    rng = np.random.default_rng(3)
    B, K = 128, 150
    per_batch = int(0.5 * B)                          # the grouped dataset's count per batch
    sizes = rng.integers(1, per_batch // 2 + 1, size=400)
    gid = groups_of(sizes)
    datasets = [ds("g", 0, 0.5, sizes=sizes), ds("x", 5000, 0.3), ds("y", 5000, 0.2)]
    plan = P.build_plan(P.PlanInputs(datasets, B, K, 9, interleave=False))
    occ = group_occurrences(plan, 0, gid, sizes)
    whole = sum(len(b) == sizes[g] and b.min() == b.max() for g, b in occ)
    assert whole / len(occ) >= 0.99
    assert len(occ) - whole == plan.groups_split[0] and len(occ) == plan.groups_total[0]
    assert plan.epochs[0] == 2                         # the test spans an epoch boundary
    interleaved = P.build_plan(P.PlanInputs(datasets, B, K, 9))
    assert np.array_equal(interleaved.counts, plan.counts)
    for k in (0, 77):                                  # interleaving only reorders a batch
        assert sorted(interleaved.batch(k)[1]) == sorted(plan.batch(k)[1])


def test_group_order_kept_and_big_groups_span_consecutive_batches():
    sizes = [3, 40, 5, 2, 7, 1, 9, 4] * 6                 # 40 > the dataset's 16 per batch
    gid = groups_of(sizes)
    plan = P.build_plan(P.PlanInputs([ds("g", 0, 0.5, sizes=sizes), ds("x", 999, 0.5)], 32, 40, 4,
                                     interleave=False))
    seq = consumed(plan, 0)
    _, batch = batch_of_sample(plan, 0)
    starts = np.concatenate(([0], np.cumsum(sizes)))
    for g in np.unique(gid[seq]):
        pos = np.flatnonzero(gid[seq] == g)
        if len(pos) == sizes[g]:                          # fully consumed in this stage
            assert np.array_equal(seq[pos], np.arange(starts[g], starts[g + 1]))   # in order
            assert np.array_equal(pos, np.arange(pos[0], pos[0] + len(pos)))       # contiguous
            assert np.all(np.diff(np.unique(batch[pos])) == 1)                      # consecutive
    big = np.flatnonzero(gid[seq] == 1)
    assert len(np.unique(batch[big])) >= 3


def test_groups_respect_counts_epochs_and_shuffle_as_units():
    sizes = np.random.default_rng(5).integers(1, 6, size=60)
    plan = P.build_plan(P.PlanInputs([ds("g", 0, 0.4, sizes=sizes), ds("x", 999, 0.6)], 20, 120, 8,
                                     interleave=False))
    seq = consumed(plan, 0)
    gid = groups_of(sizes)
    n = len(gid)
    first = gid[seq[:n]]
    # Epoch 0 = exactly every sample once; its group order is shuffled.
    assert np.array_equal(np.sort(seq[:n]), np.arange(n))
    order = first[np.concatenate(([True], first[1:] != first[:-1]))]
    assert not np.array_equal(order, np.sort(order))
    assert np.array_equal(np.sort(seq[n:2 * n]), np.arange(n))
    assert plan.epochs[0] == -(-len(seq) // n)


# --------------------------------------------------- 4. no repeats before exhaustion
@HYP
@given(st.integers(1, 60), st.integers(0, 2**32), st.booleans())
def test_every_sample_once_per_epoch(n, seed, grouped):
    sizes = [1 + (i * 7) % 4 for i in range(n)] if grouped else None
    d0 = ds("a", n, 0.3, sizes=sizes)
    plan = P.build_plan(P.PlanInputs([d0, ds("b", 50, 0.7)], 10, 60, seed, interleave=False))
    seq = consumed(plan, 0)
    N = d0.num_samples
    full = len(seq) // N
    for e in range(full):
        assert np.array_equal(np.sort(seq[e * N:(e + 1) * N]), np.arange(N))
    rest = seq[full * N:]
    assert len(np.unique(rest)) == len(rest)
    if N >= 20 and full >= 2:
        assert not np.array_equal(seq[:N], seq[N:2 * N])                 # fresh shuffle
    assert plan.epochs[0] == full + (len(rest) > 0)
    assert plan.end_offsets[0] == len(seq)


# ------------------------------------------------------------ continuation
@pytest.mark.parametrize("grouped", [False, True])
def test_stage_continues_the_same_epoch_streams(grouped):
    rng = np.random.default_rng(11)
    sizes = rng.integers(1, 8, size=70)
    datasets = [ds("g", 150, 0.35, sizes=sizes if grouped else None), ds("a", 90, 0.4), ds("b", 40, 0.25)]

    def stage(k, start=None):
        return P.build_plan(P.PlanInputs(datasets, 24, k, 5, start_offsets=start, interleave=False))

    one = stage(70)
    s1 = stage(30)
    s2 = stage(40, list(s1.end_offsets))
    assert np.array_equal(s2.start_offsets, s1.end_offsets)
    for d in range(3):
        joined = np.concatenate((consumed(s1, d), consumed(s2, d)))
        single = consumed(one, d)
        assert abs(len(joined) - len(single)) <= 2
        assert s2.end_offsets[d] == len(joined)
        if d == 0 and grouped:   # packing order differs locally; consumed sets are stream prefixes
            small, big = sorted((joined, single), key=len)
            n = len(datasets[0].group_ids)
            assert (np.bincount(small, minlength=n) <= np.bincount(big, minlength=n)).all()
        else:
            m = min(len(joined), len(single))
            assert np.array_equal(joined[:m], single[:m])


# --------------------------------------------------------- 5. determinism, I/O
def test_deterministic_and_independent_of_threads():
    rng = np.random.default_rng(2)
    inputs = random_inputs(rng, max_k=80)
    while True:
        try:
            P.prepare(inputs)
            break
        except ValueError:
            inputs = random_inputs(rng, max_k=80)
    a, b = P.build_plan(inputs, threads=1), P.build_plan(inputs, threads=4)
    for key in ARRAYS:
        assert np.array_equal(getattr(a, key), getattr(b, key))
    assert a.fingerprint == b.fingerprint == P.plan_fingerprint(inputs)
    other = P.build_plan(P.PlanInputs(inputs.datasets, inputs.global_batch_size, inputs.num_batches,
                                      inputs.seed + 1, inputs.start_offsets, inputs.interleave))
    assert other.fingerprint != a.fingerprint
    if a.num_batches and len(a.sample_ids) > 20:
        assert not np.array_equal(other.sample_ids, a.sample_ids)


def test_fingerprint_covers_every_input():
    base = P.PlanInputs([ds("a", 100, 0.6, sizes=[2] * 50), ds("b", 100, 0.4, 0.5)], 16, 10, 3)
    ref = P.plan_fingerprint(base)
    assert ref == P.plan_fingerprint(P.PlanInputs(*[getattr(base, f) for f in
                                                    ("datasets", "global_batch_size", "num_batches", "seed")]))
    variants = [
        P.PlanInputs([ds("a", 100, 0.6, sizes=[2] * 50), ds("b", 100, 0.41, 0.5)], 16, 10, 3),
        P.PlanInputs([ds("a", 100, 0.6, sizes=[2] * 49 + [1, 1]), ds("b", 100, 0.4, 0.5)], 16, 10, 3),
        P.PlanInputs([ds("a", 100, 0.6, sizes=[2] * 50), ds("c", 100, 0.4, 0.5)], 16, 10, 3),
        P.PlanInputs([ds("a", 100, 0.6, sizes=[2] * 50), ds("b", 100, 0.4, 0.4)], 16, 10, 3),
        P.PlanInputs(base.datasets, 32, 10, 3), P.PlanInputs(base.datasets, 16, 11, 3),
        P.PlanInputs(base.datasets, 16, 10, 4), P.PlanInputs(base.datasets, 16, 10, 3, [1, 0]),
        P.PlanInputs(base.datasets, 16, 10, 3, interleave=False),
    ]
    prints = {P.plan_fingerprint(v) for v in variants}
    assert len(prints) == len(variants) and ref not in prints


def test_save_load_roundtrip_atomic_and_fingerprint_checked(tmp_path):
    inputs = P.PlanInputs([ds("a", 100, 0.6, sizes=[3] * 33), ds("b", 80, 0.4)], 16, 12, 3)
    plan = P.build_plan(inputs)
    path = str(tmp_path / "plan")
    assert save_plan(plan, path)
    assert not save_plan(plan, path)                          # already published: kept
    assert os.listdir(tmp_path) == ["plan"]                   # no temp files left
    loaded = load_plan(path, P.plan_fingerprint(inputs))
    for key in ARRAYS + ("weights", "burst", "num_samples", "start_offsets"):
        assert np.array_equal(getattr(loaded, key), getattr(plan, key)), key
    for key in ("dataset_ids", "sample_ids", "counts"):         # mapped, not read whole
        assert isinstance(getattr(loaded, key), np.memmap), key
    assert loaded.names == plan.names and loaded.fingerprint == plan.fingerprint
    assert loaded.summary() == plan.summary()
    other = P.plan_fingerprint(P.PlanInputs(inputs.datasets, 16, 13, 3))
    with pytest.raises(ValueError, match="different inputs"):
        load_plan(path, other)


# ------------------------------------------------------------ 6. interleave
def _ranks_with(plan, k, dp, mbs, key):
    """For each key value in batch k, the set of ranks holding it."""
    where = {}
    for r in range(dp):
        ds_, ss = P.rank_slice(plan, k, r, dp, mbs)
        for v in key(ds_, ss):
            where.setdefault(v, set()).add(r)
    return where


@pytest.mark.parametrize("B", [64, 96, 40])
def test_interleave_spreads_datasets_and_groups_over_ranks(B):
    rng = np.random.default_rng(B)
    sizes = rng.integers(1, 9, size=300)
    gid = groups_of(sizes)
    weights = [0.3, 0.25, 0.2, 0.1, 0.08, 0.04, 0.03]
    datasets = [ds("g", 0, weights[0], sizes=sizes)] + [ds(f"d{i}", 500, w) for i, w in enumerate(weights[1:])]
    plans = {il: P.build_plan(P.PlanInputs(datasets, B, 30, 1, interleave=il)) for il in (True, False)}
    plan = plans[True]
    checked = 0
    for dp in (2, 4):
        layouts = [None] + ([1, 2] if B & (B - 1) == 0 else [])
        for mbs in layouts:
            need = dp if mbs is None else max(dp, 3)
            for k in range(plan.num_batches):
                counts = plan.counts[k]
                spread = _ranks_with(plan, k, dp, mbs, lambda d_, s_: d_)
                for d, ranks in spread.items():
                    if counts[d] >= need:
                        assert len(ranks) > 1, (dp, mbs, k, d)
                        checked += 1
                groups = _ranks_with(plan, k, dp, mbs,
                                     lambda d_, s_: [int(gid[s]) for s in s_[d_ == 0]])
                ids, samples = plan.batch(k)
                in_batch = np.bincount(gid[samples[ids == 0]], minlength=len(sizes))
                for g, ranks in groups.items():
                    if in_batch[g] >= (2 if mbs is None else 3):
                        assert len(ranks) > 1, (dp, mbs, k, g)
    assert checked > 100
    # Without interleaving some rank does receive a whole dataset (the test can fail).
    whole = any(len(r) == 1 and plans[False].counts[k][d] >= 2
                for k in range(plans[False].num_batches)
                for d, r in _ranks_with(plans[False], k, 2, None, lambda d_, s_: d_).items())
    assert whole


def test_rank_slices_partition_the_batch_like_the_loader():
    plan = P.build_plan(P.PlanInputs([ds("a", 100, 0.5), ds("b", 100, 0.5)], 16, 3, 0))
    ids, samples = plan.batch(1)
    for dp, mbs in ((2, None), (4, None), (2, 2), (4, 1)):
        parts = [P.rank_slice(plan, 1, r, dp, mbs) for r in range(dp)]
        got = sorted(zip(np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])))
        assert got == sorted(zip(ids, samples))
    try:
        from phoenix.data.loader import rank_sample_indices
    except ImportError:
        return
    for r in range(4):
        idx = rank_sample_indices(1, 16, 2, r, 4).ravel()
        ds_, ss = P.rank_slice(plan, 1, r, 4, micro_batch_size=2)
        assert np.array_equal(plan.dataset_ids[idx], ds_) and np.array_equal(plan.sample_ids[idx], ss)
    with pytest.raises(ValueError, match="multiple"):
        P.rank_slice(plan, 0, 0, 3)


# ------------------------------------------------------------ validation
@pytest.mark.parametrize("make,match", [
    (lambda: [ds("a", 10, -0.5), ds("b", 10, 1)], "'a': weight: must be finite and >= 0"),
    (lambda: [ds("a", 10, 0), ds("b", 10, 0)], "all weights are zero"),
    (lambda: [P.PlanDataset("a", 10, 1.0, group_mode="batch", group_ids=np.zeros(9, int))],
     "'a': group_ids: length 9 != num_samples 10"),
    (lambda: [P.PlanDataset("a", 6, 1.0, group_mode="batch", group_ids=np.array([0, 0, 1, 1, 0, 2]))],
     "'a': group_ids: groups are not contiguous"),
    # (only for the exact packer: a flexible dataset's group may continue into the next stage)
    (lambda: [ds("a", 0, 0.5, sizes=[2, 200]), ds("b", 0, 0.5, sizes=[2, 2])],
     "'a': group_ids: a group of 200"),
    (lambda: [ds("a", 10, 0.01, min_share=1.0), ds("b", 10, 1)], "'a': min_share: must be in \\[0, 1\\)"),
    (lambda: [ds("a", 10, 0.5, min_share=-0.1), ds("b", 10, 1)], "'a': min_share: must be in"),
    (lambda: [ds(f"d{i}", 10, 1, min_share=0.01) for i in range(9)], "B=8 is smaller than the 9 datasets"),
    (lambda: [ds("a", 0, 0.5), ds("b", 10, 0.5)], "'a': num_samples: is 0 but weight is positive"),
    (lambda: [P.PlanDataset("a", 10, 1.0, group_mode="doc")], "'a': group_mode"),
    (lambda: [ds("a", 10, 1), ds("a", 10, 1)], "names must be unique"),
    (lambda: [ds("a", 10, 0.02, 0.6), ds("b", 10, 0.02, 0.6), ds("c", 10, 1)], "burst sizes sum"),
    (lambda: [ds("a", 10, 0.5, 0.55), ds("b", 10, 0.5, 0.55)], "every weighted dataset is a burst"),
])
def test_validation_errors_name_dataset_and_field(make, match):
    with pytest.raises(ValueError, match=match):
        P.build_plan(P.PlanInputs(make(), 8, 40, 0))


def test_weights_are_normalised_with_a_note(caplog):
    with caplog.at_level(logging.INFO, logger="phoenix.data.plan"):
        a = P.build_plan(P.PlanInputs([ds("a", 50, 3.0), ds("b", 50, 1.0)], 8, 20, 0))
    assert any("normalising" in r.message for r in caplog.records)
    b = P.build_plan(P.PlanInputs([ds("a", 50, 0.75), ds("b", 50, 0.25)], 8, 20, 0))
    assert np.array_equal(a.sample_ids, b.sample_ids) and np.allclose(a.weights, [0.75, 0.25])


# ----------------------------------------------------- megatron, memory, summary
def test_megatron_blend_exceeds_one_per_batch_where_ours_does_not():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from megatron.core.datasets import helpers_cpp
    w = 1.0 / np.arange(1, 9) ** 1.2
    w /= w.sum()
    B, K = 32, 60
    index = np.zeros(B * K, dtype=np.int16)
    sample = np.zeros(B * K, dtype=np.int64)
    helpers_cpp.build_blending_indices(index, sample, w, len(w), B * K, False)
    megatron = np.stack([(index.reshape(K, B) == d).sum(axis=1) for d in range(len(w))], axis=1)
    plan = P.build_plan(P.PlanInputs([ds(f"d{i}", 10**4, x) for i, x in enumerate(w)], B, K, 0))
    ours = plan.counts
    for counts, bound_holds in ((megatron, False), (ours, True)):
        per_batch = np.abs(counts - w * B).max()
        prefix = np.abs(np.cumsum(counts - w * B, axis=0)).max()
        assert (per_batch <= 1 and prefix <= 1) == bound_holds, (per_batch, prefix)


def test_plan_is_compact_and_summary_consistent():
    sizes = [4] * 40
    plan = P.build_plan(P.PlanInputs([ds("g", 0, 0.5, sizes=sizes), ds("a", 300, 0.45),
                                      ds("r", 300, 0.05, min_share=0.25)], 16, 50, 2))
    n = plan.num_batches * plan.global_batch_size
    assert plan.dataset_ids.dtype == np.uint16 and plan.sample_ids.dtype == np.int64
    assert (plan.dataset_ids.nbytes + plan.sample_ids.nbytes) / n == 10
    rows = {r["name"]: r for r in plan.summary()}
    assert sum(r["samples_used"] for r in rows.values()) == n
    assert rows["r"]["batches_present"] == int((plan.counts[:, 2] > 0).sum()) < plan.num_batches
    assert rows["r"]["min_per_batch"] == 0 and rows["r"]["max_per_batch"] == 4
    assert rows["g"]["groups_kept_whole"] <= rows["g"]["groups_total"] > 0
    assert rows["a"]["epochs"] == 2 and rows["a"]["burst"] is False


# ------------------------------------------------------- fixed counts (warmup)
def random_fixed_counts(rng, inputs: P.PlanInputs) -> np.ndarray:
    """Random rows summing to B over the datasets that have samples."""
    D, B = len(inputs.datasets), inputs.global_batch_size
    K0 = int(rng.integers(0, inputs.num_batches + 1))
    usable = [d for d in range(D) if inputs.datasets[d].num_samples > 0]
    rows = np.zeros((K0, D), dtype=np.int32)
    for k in range(K0):
        rows[k, usable] = rng.multinomial(B, np.full(len(usable), 1 / len(usable)))
    return rows


def test_fixed_counts_are_used_verbatim_and_cpp_matches_reference():
    rng = np.random.default_rng(424242)
    built = 0
    for _ in range(60):
        inputs = random_inputs(rng)
        inputs.fixed_counts = random_fixed_counts(rng, inputs)
        try:
            prep = P.prepare(inputs, window=int(rng.choice([2, P.GROUP_WINDOW])))
        except ValueError:
            continue
        out = _assert_same(prep)
        K0 = len(inputs.fixed_counts)
        np.testing.assert_array_equal(out["counts"][:K0], inputs.fixed_counts)
        # Each batch really holds the counted samples of each dataset.
        B = inputs.global_batch_size
        for k in range(inputs.num_batches):
            got = np.bincount(out["dataset_ids"][k * B:(k + 1) * B], minlength=len(inputs.datasets))
            np.testing.assert_array_equal(got, out["counts"][k])
        built += 1
    assert built >= 30


def test_rest_of_stage_after_fixed_counts_is_allocated_from_the_weights():
    datasets = [ds("a", 500, 0.5), ds("b", 500, 0.3), ds("c", 500, 0.2)]
    fixed = np.array([[8, 0, 0], [6, 2, 0], [4, 2, 2]], dtype=np.int32)
    with_fixed = P.build_plan(P.PlanInputs(datasets, 8, 23, 3, fixed_counts=fixed))
    plain = P.build_plan(P.PlanInputs(datasets, 8, 20, 3))
    np.testing.assert_array_equal(with_fixed.counts[3:], plain.counts)
    # The streams continue through the fixed rows: each dataset's consumption is a
    # prefix of its epoch stream, the same stream the plain plan draws from.
    for d in range(3):
        a = np.sort(with_fixed.sample_ids[with_fixed.dataset_ids == d])
        assert len(np.unique(a)) == len(a) == with_fixed.end_offsets[d]
    assert P.plan_fingerprint(P.PlanInputs(datasets, 8, 23, 3, fixed_counts=fixed)) != \
        P.plan_fingerprint(P.PlanInputs(datasets, 8, 23, 3, fixed_counts=fixed[::-1].copy()))


@pytest.mark.parametrize("bad,match", [
    (np.array([[8, 0]]), r"shape \(K0, 3\)"),
    (np.array([[8, 0, 1]]), "row 0 sums to 9"),
    (np.array([[9, -1, 0]]), ">= 0"),
    (np.full((4, 3), [4, 2, 2]), "4 rows but the stage has 3"),
])
def test_fixed_counts_validation(bad, match):
    datasets = [ds("a", 50, 0.5), ds("b", 50, 0.3), ds("c", 50, 0.2)]
    with pytest.raises(ValueError, match=match):
        P.prepare(P.PlanInputs(datasets, 8, 3, 1, fixed_counts=bad))


@given(D=st.integers(2, 5), B=st.integers(1, 64), steps=st.integers(1, 40), data=st.data())
@HYP
def test_mixture_warmup_counts_are_exact_per_batch(D, B, steps, data):
    from fractions import Fraction

    def weights():
        raw = data.draw(st.lists(st.integers(0, 9), min_size=D, max_size=D).filter(any))
        return [Fraction(x, sum(raw)) for x in raw]

    start, end = weights(), weights()
    from phoenix.data.plan_counts import mixture_warmup_counts

    counts = mixture_warmup_counts(start, end, B, steps)
    assert counts.shape == (steps, D) and (counts.sum(axis=1) == B).all()
    cum_target = np.zeros(D)
    for j in range(steps):
        t = (j + 1) / (steps + 1)
        target = B * ((1 - t) * np.array(start, float) + t * np.array(end, float))
        # floor or ceil of the interpolated target, every batch
        assert (counts[j] >= np.floor(target - 1e-9)).all() and (counts[j] <= np.ceil(target + 1e-9)).all()
        cum_target += target
        # the rounding never lets a dataset drift a whole sample per batch
        assert np.abs(counts[:j + 1].sum(axis=0) - cum_target).max() < 2
