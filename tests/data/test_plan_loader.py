"""The plan-driven loader: samples read from the .bin match megatron's own reader, no
sample crosses a group, and what the loader yields (counted directly, over all DP ranks)
has the exact per-batch mixture, min_share bursts and whole groups the plan promises."""

import math
import re
from fractions import Fraction

import numpy as np
import pytest

from phoenix.data.loader import GlobalBatchLoader
from phoenix.data.plan_source import PlanSource, load_or_build_plan
from phoenix.data.samples import build_sample_index
from phoenix.testing.plan_specs import PlanDatasetSpec, build_indices, plan_inputs

SEQ = 32
B = 16
STEPS = 24


@pytest.fixture(scope="module")
def grouped_data(tiny_data, tmp_path_factory):
    from phoenix.data.preprocess import preprocess
    from phoenix.data.synthetic import write_corpus

    root = tmp_path_factory.mktemp("grouped")
    write_corpus(root / "repos.jsonl", 400, 7, domain="code", group_key="repo",
                 docs_per_group=(1, 2), min_words=5, max_words=20)
    write_corpus(root / "math.jsonl", 60, 8, domain="math")
    preprocess([str(root / "repos.jsonl")], str(root / "repos"), tiny_data.tokenizer_model,
               group_key="repo")
    preprocess([str(root / "math.jsonl")], str(root / "math"), tiny_data.tokenizer_model)
    return {"web": tiny_data.prefixes["web"], "repos": str(root / "repos"), "math": str(root / "math")}


def _megatron_stream(prefix):
    from phoenix.data.indexed import indexed_dataset_module

    ds = indexed_dataset_module().IndexedDataset(prefix)
    return np.concatenate([ds.get(i) for i in range(len(ds))]).astype(np.int64)


def test_ungrouped_samples_are_slices_of_the_document_stream(tiny_data):
    prefix = tiny_data.prefixes["web"]
    index = build_sample_index(prefix, SEQ, use_groups=False)
    stream = _megatron_stream(prefix)
    assert len(index) == (len(stream) - 2) // SEQ + 1
    from phoenix.data.samples import SampleReader

    reader = SampleReader(index, eod_id=2)
    for s in [0, 1, len(index) // 2, len(index) - 1]:
        item = reader.read(s)
        n = int(index.lengths[s])
        expected = stream[s * SEQ: s * SEQ + n]
        assert np.array_equal(np.append(item["tokens"], item["labels"][-1])[:n], expected)
        assert np.array_equal(item["labels"][: n - 1], expected[1:])
        assert item["loss_mask"].sum() == n - 1


def test_grouped_samples_never_cross_a_group(grouped_data):
    prefix = grouped_data["repos"]
    index = build_sample_index(prefix, SEQ, use_groups=True)
    doc_groups = np.load(prefix + ".groups.npy")
    for start, length, group in zip(index.starts, index.lengths, index.group_ids):
        first = index.document_of(int(start))
        last = index.document_of(int(start) + int(length) - 1)
        assert doc_groups[first] == doc_groups[last] == group
    # every token of every group is covered exactly once (plus one shared label token)
    covered = sum(int(n) - 1 for n in index.lengths)
    group_sizes = np.diff(np.concatenate([[0], np.flatnonzero(np.diff(doc_groups)) + 1,
                                          [len(doc_groups)]]))
    tokens_per_group = np.add.reduceat(np.diff(index.doc_starts), np.cumsum(group_sizes)[:-1].tolist()
                                       and np.concatenate([[0], np.cumsum(group_sizes)[:-1]]))
    assert covered == int(np.sum(tokens_per_group - 1))


def _yielded(plan, indices, dp_size, mbs):
    """(dataset_id, group_id, sample_id) of every sample the loaders of all ranks yield, by step."""
    per_step = [[] for _ in range(STEPS)]
    for rank in range(dp_size):
        loader = GlobalBatchLoader(PlanSource(plan, indices, eod_id=2), B, mbs, rank, dp_size, STEPS,
                            prefetch=2)
        for step in range(STEPS):
            for mb in loader.next_batch():
                per_step[step] += list(zip(mb["dataset_id"].tolist(), mb["group_id"].tolist(),
                                           mb["sample_id"].tolist()))
        loader.close()
    return per_step


@pytest.mark.parametrize("dp_size,mbs", [(1, 4), (2, 2), (4, 1)])
def test_loader_yields_exact_mixture_bursts_and_whole_groups(grouped_data, tmp_path, dp_size, mbs):
    specs = [PlanDatasetSpec("web", grouped_data["web"], 0.6),
             PlanDatasetSpec("repos", grouped_data["repos"], 0.35, group_mode="batch"),
             PlanDatasetSpec("math", grouped_data["math"], 0.05, min_share=0.25)]
    indices = build_indices(specs, SEQ)
    plan, _ = load_or_build_plan(plan_inputs(specs, indices, B, STEPS, seed=3), tmp_path)
    per_step = _yielded(plan, indices, dp_size, mbs)

    counts = np.zeros((STEPS, 3), dtype=np.int64)
    for k, samples in enumerate(per_step):
        assert len(samples) == B
        assert len(set((d, s) for d, _, s in samples)) == B  # no sample twice in a batch
        for d, _, _ in samples:
            counts[k, d] += 1
    # min_share bursts: math fills round(0.25*B) = 4 slots in a w*B/4 fraction of the
    # batches (Bresenham: round(K * w * B / 4) of the first K), else 0
    burst = round(0.25 * B)
    assert set(counts[:, 2]) <= {0, burst}
    assert (counts[:, 2] > 0).sum() == round(STEPS * 0.05 * B / burst)
    # repos is flexible: its count follows its whole groups, within half its largest
    # fitting group of its share of the free slots; web fills exactly the slots left
    free = B - counts[:, 2]
    v = Fraction(35, 95)
    group_len = np.bincount(indices[1].group_ids)
    fit_max = math.ceil(v * int(free.max()))
    S = max([1] + [int(x) for x in group_len if x <= fit_max])
    lag = np.cumsum(counts[:, 1]) - np.cumsum(free) * 35 / 95
    assert np.all(np.abs(lag) <= S / 2 + 1e-9), (lag, S)
    assert np.array_equal(counts[:, 0], free - counts[:, 1])
    # whole groups: every group that fits the batch where it starts (size <= ceil of
    # repos's share of its free slots) sits in that one batch
    where = {}
    for k, samples in enumerate(per_step):
        for d, g, _ in samples:
            if d == 1:
                where.setdefault(g, set()).add(k)
    fitting = [g for g, ks in where.items() if group_len[g] <= math.ceil(v * int(free[min(ks)]))]
    assert len(fitting) > 20, "the test needs groups that fit a batch"
    assert all(len(where[g]) == 1 for g in fitting)
    # consecutive batches for the rest
    for g, ks in where.items():
        assert max(ks) - min(ks) == len(ks) - 1


def test_loader_is_layout_independent(grouped_data, tmp_path):
    specs = [PlanDatasetSpec("web", grouped_data["web"], 0.7),
             PlanDatasetSpec("repos", grouped_data["repos"], 0.3, group_mode="batch")]
    indices = build_indices(specs, SEQ)
    plan, _ = load_or_build_plan(plan_inputs(specs, indices, B, STEPS, seed=5), tmp_path)
    one = _yielded(plan, indices, 1, 4)
    four = _yielded(plan, indices, 4, 1)
    assert [sorted(s) for s in one] == [sorted(s) for s in four]
    # a rank never gets a whole dataset: both datasets appear on more than one rank
    loader = [GlobalBatchLoader(PlanSource(plan, indices, 2), B, 1, r, 4, STEPS, prefetch=0) for r in range(4)]
    batch = [loader[r].next_batch() for r in range(4)]
    for d in (0, 1):
        ranks = {r for r in range(4) for mb in batch[r] if d in mb["dataset_id"].tolist()}
        assert len(ranks) > 1, d


def test_loader_iterates_and_resumes_at_a_step(grouped_data, tmp_path):
    """Iterating yields exactly ``num_steps`` batches, the same as ``next_batch``; a loader
    set to step k (what a resume does) continues with batch k."""
    specs = [PlanDatasetSpec("web", grouped_data["web"], 1.0)]
    indices = build_indices(specs, SEQ)
    plan, _ = load_or_build_plan(plan_inputs(specs, indices, B, STEPS, seed=5), tmp_path)
    source = PlanSource(plan, indices, 2)
    ids = [[mb["sample_id"].tolist() for mb in batch]
           for batch in GlobalBatchLoader(source, B, 2, 0, 1, STEPS, prefetch=2)]
    assert len(ids) == STEPS
    resumed = GlobalBatchLoader(source, B, 2, 0, 1, STEPS, prefetch=0)
    resumed.load_state_dict({"step": 3})
    assert [mb["sample_id"].tolist() for mb in resumed.next_batch()] == ids[3]
    assert resumed.state_dict() == {"step": 4}


# --- data from Megatron-LM's own preprocessing: several sequences (sentences) per document --


@pytest.fixture(scope="module")
def split_data(tiny_data, tmp_path_factory):
    """Sentence-split, grouped data written by megatron-core's IndexedDatasetBuilder."""
    from phoenix.testing.megatron_data import write_sentence_split
    from phoenix.data.synthetic import write_corpus

    root = tmp_path_factory.mktemp("split")
    write_corpus(root / "threads.jsonl", 120, 11, domain="web", group_key="thread",
                 docs_per_group=(1, 3), max_words=60)
    data = write_sentence_split(root / "threads", root / "threads.jsonl", tiny_data.tokenizer_model,
                                group_key="thread")
    assert data.num_sequences > 3 * len(data.documents)  # really several sequences per document
    return data


def test_sentence_split_document_ids_are_documents(split_data, tmp_path):
    """Provenance names documents (``document_indices``), not sequences (sentences)."""
    from phoenix.data.indexed import check_prefix
    from phoenix.data.samples import SampleReader

    facts = check_prefix(split_data.prefix)
    assert facts["num_documents"] == len(split_data.documents)
    assert facts["num_sequences"] == split_data.num_sequences
    index = build_sample_index(split_data.prefix, SEQ, use_groups=False)
    assert len(index.doc_starts) == len(split_data.documents) + 1
    doc_of = split_data.document_of_token()
    stream = np.concatenate([s for d in split_data.documents for s in d])
    reader = SampleReader(index, eod_id=2)
    for s in range(len(index)):
        item = reader.read(s)
        start, n = int(index.starts[s]), int(index.lengths[s])
        assert np.array_equal(np.append(item["tokens"], item["labels"][-1])[:n], stream[start:start + n])
        assert item["document_id"] == doc_of[start], s
    # and through the plan and the loader, as the trainer and the spike log see them
    specs = [PlanDatasetSpec("threads", split_data.prefix, 1.0)]
    indices = build_indices(specs, SEQ)
    plan, _ = load_or_build_plan(plan_inputs(specs, indices, B, 4, seed=1), tmp_path)
    loader = GlobalBatchLoader(PlanSource(plan, indices, eod_id=2), B, 4, 0, 1, 4, prefetch=2)
    seen = 0
    for batch in loader:
        for mb in batch:
            for sample_id, doc in zip(mb["sample_id"].tolist(), mb["document_id"].tolist()):
                assert doc == doc_of[int(index.starts[sample_id])] < len(split_data.documents)
                seen += 1
    assert seen == 4 * B


def test_sentence_split_groups_one_per_document_or_per_sequence(split_data, tmp_path):
    """``.groups.npy`` with one id per document (Megatron-style data, phoenix's own) or one
    per sequence: the same samples, none crossing a group; any other length is an error."""
    import shutil

    from phoenix.data.indexed import DataError

    per_doc = build_sample_index(split_data.prefix, SEQ, use_groups=True)
    token_group = split_data.groups[split_data.document_of_token()]
    for start, n, g in zip(per_doc.starts, per_doc.lengths, per_doc.group_ids):
        assert set(token_group[start:start + n].tolist()) == {g}
    # every token of a group is in one of its samples: the groups' tokens minus one label each
    assert sum(int(n) - 1 for n in per_doc.lengths) == len(token_group) - (split_data.groups.max() + 1)

    copy = str(tmp_path / "threads")
    for suffix in (".bin", ".idx"):
        shutil.copy(split_data.prefix + suffix, copy + suffix)
    per_seq = np.repeat(split_data.groups, [len(d) for d in split_data.documents])
    np.save(copy + ".groups.npy", per_seq)
    by_seq = build_sample_index(copy, SEQ, use_groups=True)
    for a, b in ((per_doc.starts, by_seq.starts), (per_doc.lengths, by_seq.lengths),
                 (per_doc.group_ids, by_seq.group_ids)):
        assert np.array_equal(a, b)

    D, S = len(split_data.documents), split_data.num_sequences
    np.save(copy + ".groups.npy", split_data.groups[:-1])
    with pytest.raises(DataError, match=rf"threads\.groups\.npy has {D - 1} entries but the dataset "
                                        rf"has {D} documents \(or {S} sequences\); it needs one "
                                        rf"group id per document"):
        build_sample_index(copy, SEQ, use_groups=True)
    np.save(copy + ".groups.npy", split_data.groups.reshape(1, -1))
    with pytest.raises(DataError, match=r"groups\.npy must be a 1-D integer array"):
        build_sample_index(copy, SEQ, use_groups=True)
    (tmp_path / "threads.groups.npy").write_bytes(b"not numpy")
    with pytest.raises(DataError, match=r"cannot read .*threads\.groups\.npy"):
        build_sample_index(copy, SEQ, use_groups=True)


# --- token ids outside the vocabulary: a DataError naming dataset and sample, not IndexError --


def _with_bad_token(tmp_path, dtype, bad_id, at):
    """Data from another builder (no .meta.json): 30 documents of ids < 100, one of them
    ``bad_id`` at token ``at``. Returns (prefix, document of the bad token)."""
    import torch

    from phoenix.data.indexed import indexed_dataset_module

    rng = np.random.default_rng(0)
    prefix = str(tmp_path / "upstream")
    builder = indexed_dataset_module().IndexedDatasetBuilder(prefix + ".bin", dtype=dtype)
    pos, bad_doc = 0, None
    for doc in range(30):
        ids = rng.integers(3, 100, size=int(rng.integers(20, 60))).astype(np.int64)
        ids[-1] = 2
        if pos <= at < pos + len(ids):
            ids[at - pos], bad_doc = bad_id, doc
        builder.add_item(torch.from_numpy(ids))
        builder.end_document()
        pos += len(ids)
    builder.finalize(prefix + ".idx")
    return prefix, bad_doc


@pytest.mark.parametrize("dtype,bad_id,prefetch", [(np.uint16, 600, 2), (np.int32, -5, 0)])
def test_token_id_outside_the_vocabulary_is_a_data_error(tmp_path, dtype, bad_id, prefetch):
    import traceback

    from phoenix.data.indexed import DataError

    at = 700
    prefix, bad_doc = _with_bad_token(tmp_path, dtype, bad_id, at)
    specs = [PlanDatasetSpec("upstream", prefix, 1.0)]
    indices = build_indices(specs, SEQ)
    steps = len(indices[0]) // 4
    plan, _ = load_or_build_plan(plan_inputs(specs, indices, 4, steps, seed=1), tmp_path)
    # The first step whose batch holds a sample covering token `at` (samples overlap by one).
    holds = {s for s in range(len(indices[0]))
             if indices[0].starts[s] <= at < indices[0].starts[s] + indices[0].lengths[s]}
    first_bad = min(k for k in range(steps) if holds & set(plan.batch(k)[1].tolist()))

    loader = GlobalBatchLoader(PlanSource(plan, indices, eod_id=2, vocab_size=512), 4, 2, 0, 1,
                               steps, prefetch=prefetch)
    good = 0
    with pytest.raises(DataError) as err:
        for _ in loader:
            good += 1
    loader.close()
    assert good == first_bad  # every batch before it was handed out; the bad one never was
    message = str(err.value)
    m = re.fullmatch(
        rf"dataset 'upstream' \({re.escape(prefix)}\): sample (\d+) holds token id {bad_id}, "
        rf"outside the vocabulary \[0, 512\) \(document {bad_doc}, token {at} of "
        rf"{re.escape(prefix)}\.bin\); was it tokenised with another tokenizer\?", message)
    assert m and int(m[1]) in holds, message
    # raised in the prefetch thread, handed to the training thread as the same DataError
    frames = [f.name for f in traceback.extract_tb(err.value.__traceback__)]
    assert ("_worker" in frames) == (prefetch > 0)

    # without a vocabulary to check against, the same data reads (the old behaviour)
    unchecked = GlobalBatchLoader(PlanSource(plan, indices, eod_id=2), 4, 2, 0, 1, steps, prefetch=0)
    assert len(list(unchecked)) == steps


def test_megatron_blend_checks_token_ids(tmp_path):
    from phoenix.data.indexed import DataError
    from phoenix.data.megatron_blend import MegatronBlendSource

    prefix, _ = _with_bad_token(tmp_path, np.uint16, 600, 700)
    kw = dict(prefixes=[prefix], weights=[1.0], names=["upstream"], seq_length=SEQ, num_samples=20,
              seed=1, vocab_size=512, eod_id=2, cache_dir=str(tmp_path / "cache"))
    import torch.distributed as dist

    # megatron's dataset builder asks torch.distributed for the rank: a world of one.
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        source = MegatronBlendSource(**kw, check_vocab_size=512)
        unchecked = MegatronBlendSource(**kw)
    finally:
        dist.destroy_process_group()
    errors = []
    for i in range(len(source)):
        try:
            source.sample(i)
        except DataError as e:
            errors.append(str(e))
    assert errors and all(re.fullmatch(
        rf"dataset 'upstream' \({re.escape(prefix)}\): sample \d+ \(blend position \d+\) holds "
        r"token id 600, outside the vocabulary \[0, 512\); was it tokenised with another "
        r"tokenizer\?", e) for e in errors), errors
    assert all(unchecked.sample(i) for i in range(len(unchecked)))


def test_loss_bearing_fraction_matches_the_samples_loss_masks(grouped_data, tmp_path):
    from phoenix.data.plan_source import loss_bearing_fraction, summary_table

    specs = [PlanDatasetSpec("web", grouped_data["web"], 0.7),
             PlanDatasetSpec("repos", grouped_data["repos"], 0.3, group_mode="batch")]
    indices = build_indices(specs, SEQ)
    plan, _ = load_or_build_plan(plan_inputs(specs, indices, B, 6, seed=2), tmp_path)
    source = PlanSource(plan, indices, eod_id=2)
    masks = [[], []]
    for i in range(len(source)):
        item = source.sample(i)
        masks[item["dataset_id"]].append(item["loss_mask"].mean())
    got = loss_bearing_fraction(plan, indices)
    assert np.allclose(got, [np.mean(m) for m in masks])
    assert got[1] < 1.0                      # grouped: padded group tails carry no loss
    assert f"{got[1]:.4f}" in summary_table(plan, indices)
