"""A stage's ``data_seed`` reshuffles every dataset from its first step (issue 24 §6b),
recounted sample by sample: a reseeded dataset's k-th planned sample (in plan order) is
its stream position k, so its reads split into epochs of ``N`` samples. Every epoch must
hold each sample exactly once -- across the reseed boundary too -- and the reads before
the boundary must be the unseeded run's; after it, the order must differ. A seed change
together with a ``seq_length`` change is recounted token by token (the re-cut test's
recount), and a resume that adds the seed equals the planned stage boundary.
"""

from __future__ import annotations

import numpy as np
import pytest

from phoenix.checkpoint.resume_contract import check_resume
from phoenix.config import ConfigError, build_config, dump_config
from phoenix.data.plan import build_plan
from phoenix.data.plan_cache import data_change, run_stage_plans
from phoenix.testing.tiny import tiny_config_dict
from tests.data.test_recut_streams import assert_epochs_exact, token_reads

B = 64


def _config(files, out, stages, steps=None, code="code", **datasets):
    d = tiny_config_dict(files, out, train={"global_batch_size": B, "micro_batch_size": 2,
                                            "seed": 3, "steps": steps})
    d["data"]["seq_length"] = 32
    d["data"]["datasets"] = [{"prefix": files.prefixes["web"], "weight": 0.6, "name": "web"},
                             {"prefix": files.prefixes[code], "weight": 0.4, "name": "code",
                              **datasets}]
    if stages is None:
        return build_config(d)
    d["train"].pop("steps")
    d["stages"] = stages
    return build_config(d)


def _stages(seed=None, seq=None, first=23, total=160):
    mix = {"web": 0.6, "code": 0.4}
    second = {"name": "after", "steps": total - first, "mixture": mix}
    if seed is not None:
        second["data_seed"] = seed
    if seq is not None:
        second["seq_length"] = seq
    return [{"name": "before", "steps": first, "mixture": mix}, second]


def sample_reads(plans, first_step=0) -> dict[str, list[int]]:
    """Per dataset: its sample ids in plan order from global step ``first_step`` on."""
    out: dict[str, list[int]] = {}
    for spi, plan in plans:
        for k in range(plan.num_batches):
            if spi.stage.start_step + k < first_step:
                continue
            for d, s in zip(*plan.batch(k)):
                out.setdefault(plan.names[int(d)], []).append(int(s))
    return out


def test_a_reseeded_stage_reads_every_sample_once_per_epoch(tiny_data, tmp_path):
    plain = run_stage_plans(_config(tiny_data, tmp_path / "a", _stages()), build_plan)
    seeded_cfg = _config(tiny_data, tmp_path / "b", _stages(seed=7))
    seeded = run_stage_plans(seeded_cfg, build_plan)
    again = run_stage_plans(seeded_cfg, build_plan)
    a, b = sample_reads(plain), sample_reads(seeded)
    assert b == sample_reads(again)                                     # deterministic
    boundary = {name: sum(1 for _ in sample_reads(plain[:1])[name]) for name in a}
    for d, name in enumerate(plain[0][1].names):
        n = int(plain[0][0].inputs.datasets[d].num_samples)
        cut = boundary[name]
        assert 0 < cut % n, f"{name}: the reseed should fall in mid-epoch"
        assert len(b[name]) > (cut // n + 1) * n, f"{name}: the run should read the next epoch"
        assert b[name][:cut] == a[name][:cut]                            # before: unchanged
        for e in range(len(b[name]) // n):                               # each epoch: all once
            assert sorted(b[name][e * n:(e + 1) * n]) == list(range(n)), f"{name} epoch {e}"
        tail = b[name][len(b[name]) // n * n:]
        assert len(set(tail)) == len(tail)
        rest = slice(cut, (cut // n + 1) * n)                            # the epoch's remainder:
        assert sorted(b[name][rest]) == sorted(set(range(n)) - set(a[name][:cut]))  # unread ones
        assert b[name][rest] != a[name][rest]                            # in a new order
        assert b[name][(cut // n + 1) * n:] != a[name][(cut // n + 1) * n:]
        assert seeded[1][0].inputs.heads[d].from_seed == 3
    # the mixture is the seed's business no more than before: the same counts per batch
    for (_, p), (_, q) in zip(plain, seeded):
        assert np.array_equal(p.counts, q.counts) and np.array_equal(p.dataset_ids, q.dataset_ids)


def test_a_reseed_with_a_new_seq_length_reads_every_token_once(tiny_data, tmp_path):
    cfg = _config(tiny_data, tmp_path, _stages(seed=7, seq=64, total=100))
    plans = run_stage_plans(cfg, build_plan)
    assert_epochs_exact(token_reads(plans), plans)
    recut = plans[1][0].inputs.heads[0]
    assert recut is not None and recut.from_seed is None             # the re-cut remainder
    plain = run_stage_plans(_config(tiny_data, tmp_path / "p", _stages(seq=64, total=100)),
                            build_plan)
    assert token_reads(plans, first_step=23)["web"] != token_reads(plain, first_step=23)["web"]


def test_a_resume_that_adds_a_data_seed_is_the_planned_boundary(tiny_data, tmp_path):
    old = _config(tiny_data, tmp_path, [{"name": "main", "steps": 160,
                                         "mixture": {"web": 0.6, "code": 0.4}}])
    new = _config(tiny_data, tmp_path, [{"name": "main", "steps": 160, "data_seed": 7,
                                         "mixture": {"web": 0.6, "code": 0.4}}])
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "config.yaml").write_text(dump_config(old))
    decision = check_resume(tmp_path / "ckpt", new, 23)    # the resume contract's verdict
    assert decision.data_changed == ["stage 'main' data_seed: None -> 7"]
    resume = data_change(old, None, 23, build_plan)
    resumed = sample_reads(run_stage_plans(new, build_plan, resume=resume))
    planned = _config(tiny_data, tmp_path / "planned", _stages(seed=7))
    planned = run_stage_plans(planned, build_plan)
    assert resumed == sample_reads(planned, first_step=23)
    # a later resume inside the reseeded epoch (another change) rebuilds the same order
    later = _config(tiny_data, tmp_path, [{"name": "main", "steps": 160, "data_seed": 7,
                                           "mixture": {"web": 0.5, "code": 0.5}}])
    again = data_change(new, resume, 30, build_plan)
    assert again.streams["web"][6] is not None                       # still in that epoch
    first = sample_reads(run_stage_plans(later, build_plan, resume=again))["web"][:20]
    assert first == sample_reads(run_stage_plans(new, build_plan, resume=resume), 30)["web"][:20]


def test_a_grouped_dataset_is_not_reshuffled(tiny_data, tmp_path):
    with pytest.raises(ConfigError, match=r"stages\[1\]: dataset 'code' is read whole-group "
                                          r"\(group_mode: batch\) under data_seed 7"):
        _config(tiny_data, tmp_path, _stages(seed=7), code="repos", group_mode="batch")
