"""Sample indices cached as memory-mapped ``.npy``: the same samples as an uncached
build (token for token), a rebuild whenever anything they depend on changes, and safe
when two processes build the same entry at once."""

import multiprocessing as mp
import os
import shutil

import numpy as np
import pytest

from phoenix.data.sample_cache import cached_sample_index
from phoenix.data.samples import SampleReader, _cut_ranges, build_sample_index, cut_range
from phoenix.testing.scale_data import group_ids, lognormal_lengths, write_prefix

SEQ = 64


@pytest.fixture
def prefix(tmp_path):
    rng = np.random.default_rng(0)
    path = str(tmp_path / "data" / "web")
    os.makedirs(tmp_path / "data")
    lengths = lognormal_lengths(400, 60, rng, minimum=1)
    write_prefix(path, lengths, seed=1)
    np.save(path + ".groups.npy", group_ids(len(lengths), 3, rng))
    return path


def _entries(cache):
    return sorted(p.name for p in cache.iterdir()) if cache.exists() else []


def _same(a, b):
    for name in ("starts", "lengths", "group_ids", "doc_starts"):
        x, y = getattr(a, name), getattr(b, name)
        assert (x is None) == (y is None), name
        if x is not None:
            assert np.array_equal(x, y) and x.dtype == y.dtype, name
    assert a.pack_groups == b.pack_groups and a.groups_digest == b.groups_digest
    assert (a.view is None) == (b.view is None)
    if a.view is not None:
        for name in ("documents", "starts", "bin_starts"):
            assert np.array_equal(getattr(a.view, name), getattr(b.view, name)), name


@pytest.mark.parametrize("grouped,min_tokens,pack", [(False, 0, 0), (True, 0, 0), (False, 80, 0),
                                                     (True, 0, 3)])
def test_cached_index_is_mapped_and_reads_the_same_tokens(prefix, tmp_path, grouped, min_tokens, pack):
    cache = tmp_path / "cache"
    built = cached_sample_index(prefix, SEQ, grouped, min_tokens, cache_dir=cache, pack_groups=pack)
    again = cached_sample_index(prefix, SEQ, grouped, min_tokens, cache_dir=cache, pack_groups=pack)
    assert len(_entries(cache)) == 1                      # built once, then a hit
    reference = build_sample_index(prefix, SEQ, grouped, min_tokens, pack)
    assert not grouped or reference.groups_digest is not None
    for index in (built, again):
        _same(index, reference)
        assert isinstance(index.starts, np.memmap) and isinstance(index.lengths, np.memmap)
        assert isinstance(index.doc_starts, np.memmap)
        assert not grouped or isinstance(index.group_ids, np.memmap)
        assert not (min_tokens or pack) or isinstance(index.view.starts, np.memmap)
    a, b = SampleReader(again, eod_id=2), SampleReader(reference, eod_id=2)
    for s in np.linspace(0, len(reference) - 1, 25).astype(int):
        x, y = a.read(int(s)), b.read(int(s))
        for k in x:
            assert np.array_equal(x[k], y[k]), (s, k)


def test_every_key_component_rebuilds(prefix, tmp_path):
    cache = tmp_path / "cache"

    def entries_after(**kw):
        args = dict(seq_length=SEQ, use_groups=False, min_document_tokens=0) | kw
        cached_sample_index(prefix, cache_dir=cache, **args)
        return len(_entries(cache))

    assert entries_after() == 1
    assert entries_after() == 1                                   # hit
    assert entries_after(seq_length=SEQ * 2) == 2
    assert entries_after(use_groups=True) == 3
    assert entries_after(use_groups=True) == 3
    assert entries_after(min_document_tokens=80) == 4
    assert entries_after(use_groups=True, pack_groups=3) == 5
    assert entries_after(use_groups=True, pack_groups=3) == 5
    assert entries_after(use_groups=False, pack_groups=3) == 5  # packing applies to groups only
    groups = np.load(prefix + ".groups.npy")
    groups[len(groups) // 2:] += 1                              # another groups file
    np.save(prefix + ".groups.npy", groups)
    assert entries_after(use_groups=True) == 6
    rebuilt = cached_sample_index(prefix, SEQ, True, cache_dir=cache)
    _same(rebuilt, build_sample_index(prefix, SEQ, True))
    # a rewritten .idx (other document lengths, same prefix) is a miss
    lengths = lognormal_lengths(300, 60, np.random.default_rng(5), minimum=1)
    write_prefix(prefix, lengths, seed=2)
    assert entries_after() == 7
    _same(cached_sample_index(prefix, SEQ, False, cache_dir=cache), build_sample_index(prefix, SEQ, False))
    # the same files at another path are another prefix
    other = str(tmp_path / "data" / "copy")
    for suffix in (".bin", ".idx"):
        shutil.copy(prefix + suffix, other + suffix)
    cached_sample_index(other, SEQ, False, cache_dir=cache)
    assert len(_entries(cache)) == 8
    assert not [n for n in _entries(cache) if n.endswith(".tmp")]


def test_vectorised_group_cut_matches_the_per_range_loop():
    rng = np.random.default_rng(3)
    sizes = rng.integers(0, 300, size=2000)
    sizes[rng.integers(0, 2000, 200)] = rng.integers(0, 3, 200)   # empty and 1-2 token ranges
    bounds = np.concatenate([[0], np.cumsum(sizes)])
    for seq in (1, 7, 64, 257):
        starts, lengths, ids = _cut_ranges(bounds[:-1], bounds[1:], seq)
        pieces = [cut_range(int(b), int(e), seq) for b, e in zip(bounds[:-1], bounds[1:])]
        assert np.array_equal(starts, np.concatenate([p[0] for p in pieces]))
        assert np.array_equal(lengths, np.concatenate([p[1] for p in pieces]))
        assert lengths.dtype == np.int32
        assert np.array_equal(ids, np.concatenate([np.full(len(p[0]), g) for g, p in enumerate(pieces)]))


def _build_at_once(prefix, cache, barrier, results):
    """Child: build the index, wait until the other child has built too, then publish."""
    import phoenix.data.sample_cache as sc

    build, publish = sc.build_sample_index, sc.publish_dir

    def build_then_wait(*args):
        index = build(*args)
        barrier.wait(timeout=60)
        return index

    def publish_and_report(path, write):
        published = publish(path, write)
        results.put(published)
        return published

    sc.build_sample_index, sc.publish_dir = build_then_wait, publish_and_report
    index = sc.cached_sample_index(prefix, SEQ, True, cache_dir=cache)
    results.put(np.asarray(index.starts).tobytes() + np.asarray(index.group_ids).tobytes())


def test_two_processes_building_at_once_publish_one_entry(prefix, tmp_path):
    cache = tmp_path / "cache"
    ctx = mp.get_context("spawn")
    barrier, results = ctx.Barrier(2), ctx.Queue()
    procs = [ctx.Process(target=_build_at_once, args=(prefix, cache, barrier, results))
             for _ in range(2)]
    for p in procs:
        p.start()
    out = [results.get(timeout=120) for _ in range(4)]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    flags = sorted(x for x in out if isinstance(x, bool))
    assert flags == [False, True]                           # both built, one published
    data = [x for x in out if isinstance(x, bytes)]
    assert data[0] == data[1]
    assert len(_entries(cache)) == 1                        # no temp directory left behind
    index = cached_sample_index(prefix, SEQ, True, cache_dir=cache)
    _same(index, build_sample_index(prefix, SEQ, True))


def test_plan_fingerprint_from_the_stored_digest_equals_the_computed_one(prefix, tmp_path):
    """The cached index stores the digest of its group boundaries so a cached start-up
    need not read every group id; the fingerprint must be the one the ids give."""
    from dataclasses import replace

    from phoenix.data.plan import plan_fingerprint
    from phoenix.testing.plan_specs import PlanDatasetSpec, build_indices, plan_inputs

    specs = [PlanDatasetSpec("web", prefix, 0.5),
             PlanDatasetSpec("code", prefix, 0.5, group_mode="batch", pack_groups=2)]
    inputs = plan_inputs(specs, build_indices(specs, SEQ, cache_dir=tmp_path / "c"), 8, 5, seed=1)
    assert inputs.datasets[1].groups_digest is not None
    computed = replace(inputs, datasets=[replace(d, groups_digest=None) for d in inputs.datasets])
    assert plan_fingerprint(inputs) == plan_fingerprint(computed)
    other = np.asarray(inputs.datasets[1].group_ids).copy()
    other[len(other) // 2:] += 1  # other boundaries: another fingerprint
    moved = replace(computed, datasets=[computed.datasets[0],
                                        replace(computed.datasets[1], group_ids=other)])
    assert plan_fingerprint(moved) != plan_fingerprint(computed)


def test_runs_over_the_same_data_share_the_sample_indices(tiny_data, tmp_path, monkeypatch, caplog):
    """Without data.cache_dir the sample indices go to the shared cache: a second run in
    another output_dir cuts nothing again (the plans stay in each run's data_cache); an
    explicit data.cache_dir holds both; an unwritable shared cache falls back to the run."""
    import phoenix.data.sample_cache as sample_cache
    from phoenix.data.plan_cache import run_stage_plans
    from phoenix.testing.tiny import tiny_config

    shared = tmp_path / "shared"
    monkeypatch.setenv("PHOENIX_CACHE_DIR", str(shared))
    run_stage_plans(tiny_config(tiny_data, tmp_path / "run_a"))
    built = sorted(p.name for p in (shared / "sample_index").glob("samples-*"))
    assert len(built) == 2  # web and code
    assert not list((tmp_path / "run_a" / "data_cache").glob("samples-*"))
    assert list((tmp_path / "run_a" / "data_cache").glob("plan-*"))

    def no_build(*args, **kwargs):
        raise AssertionError("the second run cut a dataset again")

    monkeypatch.setattr(sample_cache, "build_sample_index", no_build)
    run_stage_plans(tiny_config(tiny_data, tmp_path / "run_b"))
    assert list((tmp_path / "run_b" / "data_cache").glob("plan-*"))
    monkeypatch.undo()

    monkeypatch.setenv("PHOENIX_CACHE_DIR", str(shared))
    run_stage_plans(tiny_config(tiny_data, tmp_path / "run_c",
                                [f"data.cache_dir={tmp_path / 'own'}"]))
    assert len(list((tmp_path / "own").glob("samples-*"))) == 2

    blocker = tmp_path / "not_a_dir"
    blocker.write_text("")
    monkeypatch.setenv("PHOENIX_CACHE_DIR", str(blocker))
    with caplog.at_level("WARNING"):
        run_stage_plans(tiny_config(tiny_data, tmp_path / "run_d"))
    assert len(list((tmp_path / "run_d" / "data_cache").glob("samples-*"))) == 2
    assert "cannot be written" in caplog.text
