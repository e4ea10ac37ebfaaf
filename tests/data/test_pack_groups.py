"""Group packing of grouped datasets (``pack_groups``): units of groups cut as one stream.

Checked against independent oracles: the units' total samples against a brute-force
optimum; every unit's tokens against the groups read straight from the ``.bin``; whole
groups through a real plan by mapping every planned token back to its group, not
through the units; and the loss-bearing fraction on a realistic size distribution.
"""

import functools
import math

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from phoenix.config import ConfigError, build_config
from phoenix.data.plan import build_plan
from phoenix.data.samples import SampleReader, build_sample_index, groups_per_unit
from phoenix.testing.plan_specs import PlanDatasetSpec, build_indices, plan_inputs
from phoenix.testing.scale_data import group_ids, lognormal_lengths, write_prefix

EOD = 2


def _prefix(tmp_path, doc_lengths, groups, name="code", sparse=False):
    prefix = str(tmp_path / name)
    write_prefix(prefix, np.asarray(doc_lengths), sparse=sparse, eod_id=EOD)
    np.save(prefix + ".groups.npy", np.asarray(groups, dtype=np.int64))
    return prefix


def _group_tokens(prefix, doc_lengths, groups):
    """Each group's tokens read from the .bin in file order (the oracle's side)."""
    tokens = np.fromfile(prefix + ".bin", dtype=np.uint16).astype(np.int64)
    ends = np.cumsum(doc_lengths)
    bounds = np.concatenate([[0], ends[np.flatnonzero(np.diff(groups)) ], [ends[-1]]])
    return [tokens[bounds[g]:bounds[g + 1]] for g in range(len(bounds) - 1)]


def _min_samples(sizes, seq, cap):
    """Brute force: fewest samples over every split of ``sizes`` (in order) into units
    of consecutive groups, a unit of >= 2 groups holding <= cap samples."""
    def n(t):
        return math.ceil((t - 1) / seq) if t >= 2 else 0

    @functools.cache
    def best(i):
        if i == len(sizes):
            return 0
        out, total = None, 0
        for j in range(i, len(sizes)):
            total += sizes[j]
            if j > i and n(total) > cap:
                break
            out = n(total) + best(j + 1) if out is None else min(out, n(total) + best(j + 1))
        return out
    return best(0)


@settings(max_examples=40, deadline=None)
@example(docs=[3, 3, 3], cuts=[True] * 40, seq=4, cap=1)  # joined: 2 samples, over the cap
@given(docs=st.lists(st.integers(2, 40), min_size=1, max_size=40),
       cuts=st.lists(st.booleans(), min_size=40, max_size=40),
       seq=st.integers(4, 24), cap=st.integers(1, 5))
def test_units_hold_every_group_once_and_are_optimal(tmp_path_factory, docs, cuts, seq, cap):
    tmp_path = tmp_path_factory.mktemp("pack")
    groups = np.cumsum([0] + [int(c) for c in cuts[:len(docs) - 1]])
    prefix = _prefix(tmp_path, docs, groups)
    index = build_sample_index(prefix, seq, use_groups=True, pack_groups=cap)
    expected = _group_tokens(prefix, docs, groups)
    reader = SampleReader(index, EOD)
    ids = np.asarray(index.group_ids)
    order = list(index.view.documents)  # the groups in the packing's shuffled order
    assert sorted(order) == list(range(len(expected)))
    members = groups_per_unit(index)
    at = 0
    for unit in range(int(ids[-1]) + 1):
        samples = np.flatnonzero(ids == unit)
        assert len(samples) <= cap or members[unit] == 1
        got = []
        for s in samples:  # consecutive samples share one token
            item = reader.read(int(s))
            # provenance names the group of the sample's first token (not the unit)
            seg = np.searchsorted(index.view.starts, index.starts[s], side="right") - 1
            assert item["group_id"] == order[seg] and order.index(item["group_id"]) >= at
            n = int(index.lengths[s])
            text = np.append(item["tokens"], item["labels"][-1])[:n]
            got.append(text if not got else text[1:])
            assert item["loss_mask"].sum() == n - 1
        want = np.concatenate([expected[g] for g in order[at:at + members[unit]]])
        np.testing.assert_array_equal(np.concatenate(got), want)
        # a sample crossing from one group to the next has the EOD of the first between them
        at += int(members[unit])
    assert at == len(order)
    sizes = [len(expected[g]) for g in order]
    assert len(index) == _min_samples(tuple(sizes), seq, cap)


@pytest.mark.parametrize("seq,cap", [(4096, 32), (32768, 16)])
def test_loss_bearing_fraction_at_least_99_percent(tmp_path, seq, cap):
    """Realistic sizes (documents lognormal, mean 2k tokens; groups of 1 + geometric
    documents, mean 8, like repositories): >= 99% of the tokens carry loss with packing,
    against 88% (4k) and 42% (32k) with every group's last sample padded."""
    rng = np.random.default_rng(0)
    docs = lognormal_lengths(100_000, 2000, rng)
    prefix = _prefix(tmp_path, docs, group_ids(len(docs), 8, rng), sparse=True)

    def fraction(index):
        return (np.asarray(index.lengths, dtype=np.int64) - 1).sum() / (len(index) * seq)

    packed = fraction(build_sample_index(prefix, seq, use_groups=True, pack_groups=cap))
    padded = fraction(build_sample_index(prefix, seq, use_groups=True))
    assert packed >= 0.99 and padded < 0.9, (packed, padded)


def _batches_of_each_group(plan, index, d, B):
    """Original group -> set of batches holding any of its tokens, from the plan's
    samples and the .bin offsets they read (not from the units)."""
    seg = np.asarray(index.view.starts)
    at = np.flatnonzero(np.asarray(plan.dataset_ids) == d)
    samples = np.asarray(plan.sample_ids)[at]
    first = np.asarray(index.starts)[samples]
    last = first + np.asarray(index.lengths)[samples] - 1
    lo = np.searchsorted(seg, first, "right") - 1
    hi = np.searchsorted(seg, last, "right") - 1
    out: dict[int, set] = {}
    for batch, a, b in zip(at // B, lo, hi):
        for s in range(a, b + 1):
            out.setdefault(int(index.view.documents[s]), set()).add(int(batch))
    return out


@pytest.mark.parametrize("B,cap", [(16, 3), (64, 8)])
def test_every_group_lands_in_one_batch(tmp_path, B, cap):
    """Through a real plan (flexible: a web dataset absorbs the grouped one's deviation):
    every group, small or joined with others, is read in exactly one global batch."""
    rng = np.random.default_rng(1)
    docs = np.maximum(rng.geometric(1 / 60, 3000), 2)
    web = str(tmp_path / "web")
    write_prefix(web, np.maximum(rng.geometric(1 / 80, 3000), 2), eod_id=EOD)
    code = _prefix(tmp_path, docs, group_ids(len(docs), 3, rng))
    specs = [PlanDatasetSpec("web", web, 0.7), PlanDatasetSpec("code", code, 0.3, group_mode="batch",
                                                               pack_groups=cap)]
    seq = 64
    indices = build_indices(specs, seq)
    plan = build_plan(plan_inputs(specs, indices, B, 40, seed=3))
    where = _batches_of_each_group(plan, indices[1], 1, B)
    # a group fits when its own samples are at most the batch's fit limit ceil(v * B)
    own = np.diff(indices[1].view.starts)[np.argsort(indices[1].view.documents)]
    fits = {g for g, t in enumerate(own) if math.ceil((t - 1) / seq) <= math.ceil(0.3 * B)}
    assert len(where) > 20 and all(len(b) == 1 for g, b in where.items() if g in fits)
    assert len(fits & set(where)) > 20
    assert (groups_per_unit(indices[1]) > 1).any()  # units really join groups


def test_a_unit_larger_than_the_fit_limit_is_refused(tmp_path):
    rng = np.random.default_rng(2)
    web = str(tmp_path / "web")
    write_prefix(web, np.full(500, 50), eod_id=EOD)
    code = _prefix(tmp_path, np.full(500, 30), np.arange(500) // 2)
    specs = [PlanDatasetSpec("web", web, 0.7),
             PlanDatasetSpec("code", code, 0.3, group_mode="batch", pack_groups=6)]
    indices = build_indices(specs, 16)
    with pytest.raises(ValueError, match=r"dataset 'code': pack_groups: .* set pack_groups <= 5"):
        build_plan(plan_inputs(specs, indices, 16, 4, seed=rng.integers(100)))


@pytest.mark.parametrize("entry,what", [
    ({"pack_groups": -1}, "pack_groups: must be >= 0"),
    ({"pack_groups": 4}, r"data\.datasets\[0\]\.pack_groups: dataset '.*' is never read with "
                         r"group_mode batch"),
    ({"pack_groups": 4, "min_document_tokens": 100},
     r"data\.datasets\[0\]\.pack_groups: .* min_document_tokens view"),
])
def test_config_refuses_pack_groups_where_it_would_be_ignored(entry, what):
    from tests.config.test_config import base

    cfg = base()
    cfg["data"]["datasets"][0].update(entry)
    with pytest.raises(ConfigError, match=what):
        build_config(cfg)
    cfg["data"]["datasets"][0].pop("min_document_tokens", None)
    if entry["pack_groups"] > 0:  # read grouped in a stage: accepted
        cfg["data"]["datasets"][0]["group_mode"] = "batch"
        assert build_config(cfg).data.datasets[0].pack_groups == 4


def test_the_exact_packer_refuses_units_larger_than_the_batch_too(tmp_path):
    """Only grouped datasets (no ungrouped one to absorb): the exact packer; a unit can
    never be larger than the batch."""
    code = _prefix(tmp_path, np.full(400, 30), np.arange(400) // 2)
    specs = [PlanDatasetSpec("code", code, 1.0, group_mode="batch", pack_groups=9)]
    indices = build_indices(specs, 16)
    with pytest.raises(ValueError, match=r"pack_groups: .* set pack_groups <= 8"):
        build_plan(plan_inputs(specs, indices, 8, 4, seed=1))


def test_a_flexible_group_larger_than_the_stage_continues_in_the_next(tmp_path):
    """A short stage (or the rest of a resumed one) may take fewer samples from a grouped
    dataset than its largest group: a flexible dataset's group then spans into the next
    stage instead of the plan refusing the stage."""
    web = str(tmp_path / "web")
    write_prefix(web, np.full(400, 50), eod_id=EOD)
    code = _prefix(tmp_path, np.full(100, 40), np.arange(100) // 25)  # groups of ~63 samples
    specs = [PlanDatasetSpec("web", web, 0.7), PlanDatasetSpec("code", code, 0.3, group_mode="batch")]
    indices = build_indices(specs, 16)
    first = build_plan(plan_inputs(specs, indices, 8, 3, seed=1))
    assert 0 < first.end_offsets[1] < 63
    second = build_plan(plan_inputs(specs, indices, 8, 30, seed=1,
                                    start_offsets=list(first.end_offsets)))
    both = np.concatenate([np.asarray(p.sample_ids)[np.asarray(p.dataset_ids) == 1]
                           for p in (first, second)])
    # the group begun in the first stage is finished at the start of the second
    ids = np.asarray(indices[1].group_ids)
    group = np.flatnonzero(ids == ids[both[0]])
    assert len(group) > first.end_offsets[1]
    where = np.flatnonzero(np.isin(both, group))  # (samples interleave within a batch)
    assert len(where) == len(group) and where.max() < len(group) + 8


def test_run_with_pack_groups_trains_on_units_and_resume_refuses_a_change(tiny_data, tmp_path):
    """``data.datasets[].pack_groups`` reaches the run's sample index (cached, mapped) and
    plan; changing it on resume would re-cut the stream, so it is refused by name."""
    from phoenix.checkpoint.resume_contract import check_resume
    from phoenix.config import dump_config
    from phoenix.data.plan_cache import run_stage_plans
    from phoenix.data.stage_plans import StagedSource
    from phoenix.testing.tiny import tiny_config_dict

    from tests.config.test_config import key

    datasets = [{"prefix": tiny_data.prefixes["web"], "weight": 0.6, "name": "web"},
                {"prefix": tiny_data.prefixes["repos"], "weight": 0.4, "name": "repos",
                 "group_mode": "batch", "pack_groups": 8}]
    run = tmp_path / "run"
    train = {"global_batch_size": 32, "micro_batch_size": 4, "steps": 6}

    def config():
        return build_config(tiny_config_dict(tiny_data, run, data={"datasets": datasets}, train=train))

    cfg = config()
    (spi, plan), = run_stage_plans(cfg)
    index = spi.indices[1]
    assert index.pack_groups == 8 and (groups_per_unit(index) > 1).any()
    assert isinstance(index.starts, np.memmap)  # from the run's cache
    source = StagedSource([(spi, plan)], eod_id=0)
    assert sum(source.sample(i)["dataset_id"] == 1 for i in range(len(source))) \
        == plan.counts[:, 1].sum() > 0

    ckpt = run / "checkpoints" / "step_000003"
    ckpt.mkdir(parents=True)
    (ckpt / "config.yaml").write_text(dump_config(cfg))
    assert check_resume(ckpt, cfg, 3).honoured == []
    datasets[1]["pack_groups"] = 4
    with pytest.raises(ConfigError, match=key("dataset 'repos' pack_groups: 8 -> 4")):
        check_resume(ckpt, config(), 3)
