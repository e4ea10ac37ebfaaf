"""A change of ``seq_length`` in mid-epoch continues every dataset's epoch exactly (issue 22
§3, case ``resume-seq-length-rereads``): recounted token by token.

Every planned sample of the run is mapped back to the input tokens it trains on
(``(dataset, document, .bin offset)``, through the sample index's own pieces), in training
order. Within an epoch no token may be read twice, and the first epoch's reads must be
every input token of the dataset exactly once (none skipped) -- across a stage that
changes ``seq_length`` and across a resume that does, at the same step.
"""

from __future__ import annotations

import numpy as np
import pytest

from phoenix.config import build_config
from phoenix.data.plan_cache import data_change, run_stage_plans
from phoenix.testing.tiny import tiny_config_dict

B = 64


def _config(files, out, stages=None, seq=32, steps=60, grouped=False, web_extra=None, **data):
    d = tiny_config_dict(files, out, train={"global_batch_size": B, "micro_batch_size": 2,
                                            "seed": 3, "steps": steps})
    d["data"]["seq_length"] = seq
    d["data"]["datasets"] = [{"prefix": files.prefixes["web"], "weight": 0.6, "name": "web",
                              **(web_extra or {})},
                             {"prefix": files.prefixes["repos"], "weight": 0.4, "name": "repos",
                              **({"group_mode": "batch"} if grouped else {})}]
    d["data"].update(data)
    if stages:
        d["train"].pop("steps")
        d["stages"] = stages
    return build_config(d)


def token_reads(plans, first_step=0, last_step=None):
    """Per dataset name: (document, .bin offset) of every input token trained on, in
    training order, by the plans' batches ``[first_step, last_step)`` (global steps)."""
    reads: dict[str, list[tuple[int, int]]] = {}
    for spi, plan in plans:
        for k in range(plan.num_batches):
            step = spi.stage.start_step + k
            if step < first_step or last_step is not None and step >= last_step:
                continue
            for d, s in zip(*plan.batch(k)):
                ix = spi.indices[int(d)]
                n = int(ix.lengths[s]) - 1           # real inputs (the last token is a label)
                out = reads.setdefault(plan.names[int(d)], [])
                for at, count in ix.physical_ranges(int(ix.starts[s]), n):
                    offsets = np.arange(at, at + count)
                    docs = np.searchsorted(ix.doc_starts, offsets, side="right") - 1
                    out += zip(docs.tolist(), offsets.tolist())
    return reads


def input_tokens(ix, n: int) -> list[int]:
    """The .bin offsets of every input token of one epoch of sample index ``ix``: its first
    ``n`` samples (a continued index's remainder comes after them)."""
    out = []
    for s in range(n):
        for at, count in ix.physical_ranges(int(ix.starts[s]), int(ix.lengths[s]) - 1):
            out += range(at, at + count)
    return sorted(out)


def assert_epochs_exact(reads: dict, plans) -> None:
    """Each dataset's first epoch is every input token once; later reads never repeat
    inside their own epoch."""
    checked = 0
    for name, seq in reads.items():
        d = plans[0][1].names.index(name)
        spi = plans[0][0]
        epoch = input_tokens(spi.indices[d], int(spi.inputs.datasets[d].num_samples))
        offsets = [o for _, o in seq]
        first = offsets[:len(epoch)]
        assert len(set(first)) == len(first), f"{name}: a token read twice in the first epoch"
        if len(offsets) >= len(epoch):
            assert sorted(first) == epoch, f"{name}: tokens skipped in the first epoch"
            rest = offsets[len(epoch):2 * len(epoch)]
            assert len(set(rest)) == len(rest), f"{name}: a token read twice in the second epoch"
            checked += 1
    assert checked, "the run should finish the first epoch of some dataset"


@pytest.mark.parametrize("grouped,view", [(False, False), (True, False), (False, True)])
def test_a_stage_that_changes_seq_length_continues_the_epoch(tiny_data, tmp_path, grouped, view,
                                                             caplog):
    # view: web read as its documents of >= 200 tokens (a min_document_tokens view)
    mix = {"web": 0.6, "repos": {"weight": 0.4, **({"group_mode": "batch"} if grouped else {})}}
    stages = [{"name": "short", "steps": 23, "mixture": mix},
              {"name": "long", "steps": 60, "seq_length": 64, "mixture": mix}]
    cfg = _config(tiny_data, tmp_path, stages=stages, grouped=grouped,
                  web_extra={"min_document_tokens": 200} if view else {})
    plans = run_stage_plans(cfg)
    (s1, p1), (s2, p2) = plans
    web = p1.names.index("web")
    assert 0 < p1.end_offsets[web] % len(s1.indices[web])      # the change is in mid-epoch
    assert_epochs_exact(token_reads(plans), plans)
    assert "may be read twice" not in caplog.text       # the exact continuation, no fallback
    assert s2.origins[web] is not None and (s2.origins[1] is None) == grouped


def test_a_resume_that_changes_seq_length_continues_the_epoch(tiny_data, tmp_path):
    # the case: 64 -> 128 at step 10 of 40 (here 32 -> 64 at step 17 of 60)
    old = _config(tiny_data, tmp_path, seq=32)
    new = _config(tiny_data, tmp_path, seq=64)
    resume = data_change(old, None, 17)
    before = token_reads(run_stage_plans(old), last_step=17)
    after_plans = run_stage_plans(new, resume=resume)
    after = token_reads(after_plans, first_step=17)
    reads = {n: before.get(n, []) + after.get(n, []) for n in set(before) | set(after)}
    assert_epochs_exact(reads, after_plans)
    # a later resume with another data change (same cut) rebuilds the same remainder
    again = data_change(new, resume, 25)
    assert again.streams["web"][4] == resume.streams["web"][:4]
    later = token_reads(run_stage_plans(new, resume=again), first_step=25)
    assert later["web"] == token_reads(after_plans, first_step=25)["web"]


def test_a_resume_without_exact_continuation_is_refused(tiny_data, tmp_path):
    old = _config(tiny_data, tmp_path, seq=32, grouped=False)
    new = _config(tiny_data, tmp_path, seq=32, grouped=True)
    with pytest.raises(ValueError, match=r"dataset 'repos' would be read with \(seq_length, "
                                         r"grouped\) \(32, True\) instead of \(32, False\)"):
        run_stage_plans(new, resume=data_change(old, None, 17))


def test_a_run_planned_before_exact_recuts_keeps_its_plans(tiny_data, tmp_path, caplog):
    """A checkpoint without DataState's ``stream_recut`` mark was planned with the old
    rule (the new cut starts at the same fraction of an epoch): its resumes rebuild that."""
    from phoenix.data.data_resume import DataState

    stages = [{"name": "short", "steps": 23, "mixture": {"web": 0.6, "repos": 0.4}},
              {"name": "long", "steps": 20, "seq_length": 64, "mixture": {"web": 0.6, "repos": 0.4}}]
    cfg = _config(tiny_data, tmp_path, stages=stages)
    (s1, p1), (s2, p2) = run_stage_plans(cfg, recut=False)
    n32, n64 = len(s1.indices[0]), len(s2.indices[0])
    assert p2.start_offsets[0] == -(-int(p1.end_offsets[0]) * n64 // n32)
    assert s2.origins[0] is None and "may be read twice" in caplog.text
    assert "stream_recut" in DataState().state_dict()
    assert "stream_recut" not in DataState(recut=False).state_dict()
