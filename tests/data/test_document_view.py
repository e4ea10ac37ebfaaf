"""``min_document_tokens`` views: only the long documents of a prefix, packed as one
stream, read back token for token against an independent concatenation."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from phoenix.config import ConfigError, build_config
from phoenix.data.indexed import DataError, indexed_dataset_module
from phoenix.data.samples import SampleReader, build_sample_index

from tests.config.test_config import base, key

EOD = 0


def write_prefix(prefix, lengths) -> list[np.ndarray]:
    """Documents of the given lengths (last token EOD; token = 1000*doc + position + 1)."""
    builder = indexed_dataset_module().IndexedDatasetBuilder(f"{prefix}.bin", dtype=np.int32)
    docs = []
    for d, n in enumerate(lengths):
        doc = (1000 * d + np.arange(n) + 1).astype(np.int32)
        doc[-1] = EOD
        builder.add_item(torch.from_numpy(doc))
        builder.end_document()
        docs.append(doc)
    builder.finalize(f"{prefix}.idx")
    return docs


def check_view(prefix, docs, seq, m):
    kept = [d for d, doc in enumerate(docs) if len(doc) >= m]
    stream = np.concatenate([docs[d] for d in kept])          # the independent reference
    index = build_sample_index(str(prefix), seq, use_groups=False, min_document_tokens=m)
    reader = SampleReader(index, EOD, vocab_size=1000 * len(docs) + 1000)
    assert len(index) == -(-(len(stream) - 1) // seq)
    for i in range(len(index)):
        s = reader.read(i)
        want = stream[i * seq:i * seq + seq + 1]
        got = np.concatenate([s["tokens"], s["labels"][-1:]])
        assert np.array_equal(got[:len(want)], want), f"sample {i}"
        assert s["loss_mask"].sum() == len(want) - 1
        first = int(want[0]) // 1000 if want[0] != EOD else None
        if first is not None:
            assert s["document_id"] == first and first in kept


def test_view_keeps_only_long_documents(tmp_path):
    docs = write_prefix(tmp_path / "d", [5, 40, 3, 17, 64, 16, 2, 33])
    check_view(tmp_path / "d", docs, seq=16, m=16)
    check_view(tmp_path / "d", docs, seq=7, m=33)
    check_view(tmp_path / "d", docs, seq=16, m=0 or 1)


@settings(max_examples=25, deadline=None)
@given(lengths=st.lists(st.integers(2, 60), min_size=1, max_size=12), seq=st.integers(2, 20),
       m=st.integers(2, 60))
def test_view_matches_concatenation(tmp_path_factory, lengths, seq, m):
    if max(lengths) < m or sum(n for n in lengths if n >= m) < 2:
        return
    prefix = tmp_path_factory.mktemp("v") / "d"
    check_view(prefix, write_prefix(prefix, lengths), seq, m)


def test_no_document_long_enough_names_the_prefix(tmp_path):
    write_prefix(tmp_path / "d", [5, 9])
    with pytest.raises(DataError, match="no document has min_document_tokens 10 tokens "
                                        r"\(the longest has 9\)"):
        build_sample_index(str(tmp_path / "d"), 4, use_groups=False, min_document_tokens=10)


@pytest.mark.parametrize("entry,sampler,what", [
    ({"min_document_tokens": -1}, "plan", "min_document_tokens: must be >= 0"),
    ({"min_document_tokens": 8, "group_mode": "batch"}, "plan", "cannot be combined with group_mode"),
    ({"min_document_tokens": 8}, "megatron", "data.sampler: 'megatron' cannot read min_document_tokens"),
])
def test_config_errors(entry, sampler, what):
    d = base(data={"sampler": sampler, "datasets": [{"prefix": "/x/web"},
                                                    {"prefix": "/x/web", "name": "web_long", **entry}]})
    with pytest.raises(ConfigError, match=key(what)):
        build_config(d)


def test_run_plan_reads_the_view_and_resume_keeps_both_streams(tiny_data, tmp_path):
    """A long-document view next to its full prefix: the plan reads only long documents
    for it, and the resume contract does not take the shared prefix for a rename."""
    from phoenix.checkpoint.resume_contract import check_resume
    from phoenix.config import dump_config
    from phoenix.data.samples import build_sample_index as full_index
    from phoenix.data.plan_cache import run_stage_plans
    from phoenix.data.stage_plans import StagedSource
    from phoenix.testing.tiny import tiny_config_dict

    web = tiny_data.prefixes["web"]
    doc_lengths = np.diff(full_index(web, 64, use_groups=False).doc_starts)
    m = int(np.percentile(doc_lengths, 75))
    datasets = [{"prefix": web, "weight": 0.5, "name": "web"},
                {"prefix": web, "weight": 0.5, "name": "web_long", "min_document_tokens": m}]
    cfg = build_config(tiny_config_dict(tiny_data, tmp_path / "run", data={"datasets": datasets}))
    plans = run_stage_plans(cfg)
    source = StagedSource(plans, eod_id=0)
    (spi, plan), = plans
    assert spi.indices[1].view is not None and spi.indices[0].view is None
    long_docs = set(np.flatnonzero(doc_lengths >= m).tolist())
    seen = 0
    for i in range(len(source)):
        item = source.sample(i)
        if item["dataset_id"] == 1:
            assert item["document_id"] in long_docs
            seen += 1
    assert seen == plan.counts[:, 1].sum() > 0

    ckpt = tmp_path / "run" / "checkpoints" / "step_000003"
    ckpt.mkdir(parents=True)
    (ckpt / "config.yaml").write_text(dump_config(cfg))
    assert check_resume(ckpt, cfg, 3).honoured == []
    datasets[1]["min_document_tokens"] = m + 1
    changed = build_config(tiny_config_dict(tiny_data, tmp_path / "run", data={"datasets": datasets}))
    with pytest.raises(ConfigError, match=key(f"dataset 'web_long' min_document_tokens: {m} -> {m + 1}")):
        check_resume(ckpt, changed, 3)
