"""Multi-stage recipes: stage table, per-stage plans, and training through the stages.

Expected mixtures are recomputed here from the recipe with the issue's formulas (replay:
``x * replayed + (1 - x) * own``; warmup: linear in ``(j + 1) / (N + 1)``), stream
positions from the Python reference permutation, and LR values from megatron-core's
own scheduler; nothing is read back from what the stage code reports about itself.
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

import numpy as np
import pytest

from phoenix.config import ConfigError, build_config
from phoenix.monitor.tensorboard import tensorboard_dir
from phoenix.testing import plan_reference as R
from phoenix.testing.tiny import tiny_config_dict

B = 16


def recipe(files, out, **changes) -> dict:
    """Three stages: web+code; anneal with math + 50% replay and a 2-step mixture warmup;
    grouped repositories + 50% replay of stage 1 at a new batch and sequence length."""
    d = tiny_config_dict(files, out, train={"global_batch_size": B, "micro_batch_size": 2, "seed": 7})
    d["optim"] = {"schedule": {"peak_lr": 3e-3, "min_lr": 3e-4}}
    d["train"].pop("steps")
    d["data"]["datasets"] = [{"prefix": files.prefixes[n], "name": n}
                             for n in ("web", "code", "math", "repos")]
    d["stages"] = [
        {"name": "s1", "steps": 4, "mixture": {"web": 0.75, "code": 0.25},
         "lr": [{"kind": "warmup", "steps": 2}, {"kind": "constant", "steps": 2}]},
        {"name": "s2", "steps": 5, "mixture": {"math": 0.5, "code": 0.5}, "replay": 0.5,
         "mixture_warmup_steps": 2, "lr": [{"kind": "constant", "steps": 5}]},
        {"name": "s3", "steps": 6, "mixture": {"repos": {"weight": 1.0, "group_mode": "batch"}},
         "replay": {"fraction": 0.5, "stage": "s1"}, "global_batch_size": 2 * B, "seq_length": 32,
         "lr": [{"kind": "decay", "steps": 6, "target_lr": 3e-4, "shape": "cosine"}]},
    ]
    for key, value in changes.items():
        d[key] = value
    return d


# Stage weights over (web, code, math, repos), from the recipe by hand.
S1 = np.array([0.75, 0.25, 0, 0])
S2 = 0.5 * S1 + 0.5 * np.array([0, 0.5, 0.5, 0])
S3 = 0.5 * S1 + 0.5 * np.array([0, 0, 0, 1.0])


def expected_weights(step: int) -> tuple[np.ndarray, int]:
    """(target weights, global batch size) of 0-based ``step`` of the recipe."""
    if step < 4:
        return S1, B
    if step < 9:
        j = step - 4
        if j < 2:
            t = (j + 1) / 3
            return (1 - t) * S1 + t * S2, B
        return S2, B
    return S3, 2 * B


def assert_counts_follow_mixture(counts: np.ndarray, step: int) -> None:
    w, size = expected_weights(step)
    target = size * w
    assert counts.sum() == size, (step, counts)
    assert (counts >= np.floor(target - 1e-9)).all() and (counts <= np.ceil(target + 1e-9)).all(), \
        (step, counts, target)


# ---------------------------------------------------------------- stage table
def test_stage_table_expands_replay_and_lengths(tiny_data, tmp_path):
    d = recipe(tiny_data, tmp_path)
    d["stages"][2]["tokens"] = 2 * B * 32 * 5 + 1   # one token more than 5 steps -> 6 steps
    del d["stages"][2]["steps"]
    cfg = build_config(d)
    table = cfg.resolved.stages
    assert [(s.name, s.start_step, s.end_step) for s in table.stages] == [
        ("s1", 0, 4), ("s2", 4, 9), ("s3", 9, 15)]
    assert cfg.train.steps == 15
    for s, want in zip(table.stages, (S1, S2, S3)):
        np.testing.assert_allclose([float(w) for w in s.weights], want, atol=1e-12)
    assert table.stages[2].start_sample == 9 * B
    assert table.samples_before(15) == 9 * B + 6 * 2 * B
    assert [table.tokens_per_step(k) for k in (0, 8, 9, 14)] == [B * 64] * 2 + [2 * B * 32] * 2
    # The replay-only datasets keep the replayed stage's settings; repos is grouped here.
    assert table.stages[2].group_mode == ("none", "none", "none", "batch")


def test_stage_lr_phases_equal_megatron_wsd(tiny_data, tmp_path):
    """Stage 1 warmup + constant, stage 2 a decay: one WSD schedule in megatron's terms."""
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    from phoenix.config.schedule import resolve

    d = recipe(tiny_data, tmp_path)
    d["stages"] = [
        {"name": "stable", "steps": 30, "mixture": {"web": 1.0},
         "lr": [{"kind": "warmup", "steps": 10}, {"kind": "constant", "steps": 20}]},
        {"name": "anneal", "steps": 20, "mixture": {"code": 1.0}, "replay": 0.2,
         "lr": [{"kind": "decay", "steps": 20, "target_lr": 3e-4, "shape": "1-sqrt"}]},
    ]
    cfg = build_config(d)
    resolved = resolve(cfg.resolved.schedule_config, cfg.resolved.tokens_per_step, total_steps=50)

    class _Opt:
        param_groups = [{"max_lr": 3e-3, "min_lr": 3e-4, "lr_mult": 1.0, "wd_mult": 1.0}]

    opt = _Opt()
    ref = OptimizerParamScheduler(opt, init_lr=0.0, max_lr=3e-3, min_lr=3e-4, lr_warmup_steps=10,
                                  lr_decay_steps=50, lr_decay_style="WSD", start_wd=0.1,
                                  end_wd=0.1, wd_incr_steps=50, wd_incr_style="constant",
                                  wsd_decay_steps=20, lr_wsd_decay_style="minus_sqrt")
    for k in range(55):
        assert resolved.lr_at(k) == pytest.approx(ref.get_lr(opt.param_groups[0]), rel=1e-12, abs=0), k
        ref.step(1)
    assert [p.label for p in resolved.phases] == ["stable/warmup", "stable/constant", "anneal/decay"]


BAD = [
    (lambda d: d["stages"][1]["mixture"].update(mathh=0.1),
     "stages[1].mixture.mathh: unknown dataset (data.datasets has: web, code, math, repos)"),
    (lambda d: d["stages"][0].update(replay=0.2), "stages[0].replay: the first stage has no earlier stage"),
    (lambda d: d["stages"][2].update(replay={"fraction": 0.5, "stage": "s9"}),
     "stages[2].replay.stage: 's9' is not an earlier stage (earlier: s1, s2)"),
    (lambda d: d["stages"][1].update(replay=1.5), "stages[1].replay.fraction: must be in (0, 1)"),
    (lambda d: d["train"].update(steps=20),
     "stages: the stages add up to 15 steps (s1 4 + s2 5 + s3 6) but train.steps is 20"),
    (lambda d: d["stages"][1]["lr"][0].update(steps=4),
     "stages[1].lr: the phases add up to 4 steps (constant 4) but stage 's2' has 5 steps "
     "(a gap of 1 steps before the next stage)"),
    (lambda d: d["stages"][0]["lr"][1].update(steps=3),
     "stages[0].lr: the phases add up to 5 steps (warmup 2 + constant 3) but stage 's1' has 4 "
     "steps (overlapping the next stage by 1 steps)"),
    (lambda d: d["stages"][2]["lr"][0].update(target_lr=3.5e-3),
     "stages[2].lr[0].target_lr: 0.0035 is above the LR at the start of the decay"),
    (lambda d: d["stages"][1].pop("lr"), "stages[1].lr: missing; when one stage gives its LR phases"),
    (lambda d: d["optim"]["schedule"].update(phases=[{"kind": "constant", "steps": 15}]),
     "optim.schedule.phases: the stages give their own lr phases"),
    (lambda d: d["stages"][0].update(mixture_warmup_steps=2),
     "stages[0].mixture_warmup_steps: the first stage has no previous mixture"),
    (lambda d: d["stages"][1].update(mixture_warmup_steps=5),
     "stages[1].mixture_warmup_steps: 5 is not shorter than the stage (5 steps)"),
    (lambda d: d["stages"][2].update(seq_length=4096), "stages[2].seq_length: 4096 exceeds model.max_seq_length"),
    (lambda d: d["stages"][2].update(name="s1"), "stages[2].name: 's1' is used by an earlier stage"),
    (lambda d: d["stages"][0].update(tokens=100), "stages[0].steps: give exactly one of 'steps' and 'tokens' (got both)"),
    (lambda d: d["stages"][0].update(mixture={"web": 0.0}), "stages[0].mixture: the weights sum to zero"),
    (lambda d: d["data"].update(sampler="megatron"), "stages: multi-stage runs need data.sampler: plan"),
]


@pytest.mark.parametrize("mutate,message", BAD, ids=range(len(BAD)))
def test_bad_recipes_fail_at_load_naming_the_key(mutate, message, tiny_data, tmp_path):
    d = recipe(tiny_data, tmp_path)
    mutate(d)
    with pytest.raises(ConfigError) as err:
        build_config(d)
    assert str(err.value).startswith(message), str(err.value)


def test_stage_batch_size_checked_against_the_layout(tiny_data, tmp_path):
    d = recipe(tiny_data, tmp_path)
    d["stages"][2]["global_batch_size"] = 6
    cfg = build_config(d)
    with pytest.raises(ConfigError, match=r"stages\[2\].global_batch_size: 6 is not divisible by "
                                          r"micro_batch_size \* data_parallel_size = 2\*2"):
        cfg.validate_layout(2)


# -------------------------------------------------------------- stage plans
def _stage_plans(cfg):
    from phoenix.data.plan_cache import run_stage_plans

    return run_stage_plans(cfg)


def test_stage_plans_follow_every_mixture_and_the_warmup(tiny_data, tmp_path):
    cfg = build_config(recipe(tiny_data, tmp_path))
    plans = _stage_plans(cfg)
    step = 0
    for spi, plan in plans:
        for k in range(plan.num_batches):
            ds, _ = plan.batch(k)
            assert_counts_follow_mixture(np.bincount(ds, minlength=4), step)
            step += 1
    assert step == 15


def _stream(n: int, seed: int, name: str, start: int, stop: int) -> np.ndarray:
    key = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "little")
    return R.consume_plain(n, seed, key, start, stop - start)[0]


def test_consumption_continues_across_stages(tiny_data, tmp_path):
    """web and code are read in s1, s2 and (web) s3's replay at the same sequence length in
    s1/s2: together the stages consume exactly the start of each epoch stream, no sample
    twice; s3 reads web at another sequence length: the rest of its epoch, re-cut."""
    cfg = build_config(recipe(tiny_data, tmp_path))
    plans = _stage_plans(cfg)
    (i1, p1), (i2, p2), (i3, p3) = plans
    for d, name in ((0, "web"), (1, "code")):
        assert p2.start_offsets[d] == p1.end_offsets[d] > 0
        used = np.concatenate([p.sample_ids[p.dataset_ids == d] for p in (p1, p2)])
        n = len(i1.indices[d])
        assert len(used) < n  # within one epoch: no repeats allowed
        want = _stream(n, cfg.train.seed, name, 0, len(used))
        assert sorted(used.tolist()) == sorted(want.tolist())
        assert len(set(used.tolist())) == len(used)
    # s3: web re-cut at seq 32 in mid-epoch: epoch 0 of the new cut holds only the R samples
    # re-cut from its unread rest, at its end (tests/data/test_recut_streams.py recounts them)
    web = 0
    n32 = int(i3.inputs.datasets[web].num_samples)
    rest = len(i3.indices[web]) - n32
    assert i3.origins[web] is not None and 0 < rest < n32
    assert p3.start_offsets[web] == n32 - rest
    # math is read only in s2: it starts at 0; repos only in s3.
    assert p2.start_offsets[2] == 0 and p3.start_offsets[3] == 0


def test_mixture_warmup_keeps_grouped_datasets_whole(tiny_data, tmp_path):
    """repos comes in with a warmup in a grouped stage: its groups still stay in one batch."""
    d = recipe(tiny_data, tmp_path)
    d["stages"][2]["mixture_warmup_steps"] = 3
    cfg = build_config(d)
    (_, _), (_, _), (i3, p3) = _stage_plans(cfg)
    groups = i3.indices[3].group_ids
    batch_of = {}
    for k in range(p3.num_batches):
        ds, ss = p3.batch(k)
        for g in set(groups[ss[ds == 3]].tolist()):
            batch_of.setdefault(g, set()).add(k)
    split = [g for g, ks in batch_of.items() if len(ks) > 1]
    sizes = np.bincount(groups)
    counts = p3.counts[:, 3]
    # Only groups larger than some batch's repos count may span batches.
    assert all(sizes[g] > counts.min() for g in split), split


# ------------------------------------------------------------ training (slow)
def _run(files, out, overrides=(), tensorboard=False, **changes):
    from phoenix.testing.distributed import run_distributed
    from phoenix.testing.workers import train_and_record

    d = recipe(files, out, **changes)
    d["logging"] = {"log_interval": 1, "tensorboard": tensorboard}
    d["checkpoint"] = {"save_at_end": True}
    (result,) = run_distributed(train_and_record, 1, d, list(overrides))
    return result


@pytest.mark.slow
def test_three_stage_run_resumes_identically_at_boundary_and_mid_stage(tiny_data, tmp_path):
    full = _run(tiny_data, tmp_path / "full", tensorboard=True)
    assert full["step"] == 15
    assert full["stage_starts"] == {"s1": 0, "s2": 4, "s3": 9}
    # What the loader yielded, step by step, follows the stage mixtures and the warmup.
    for k, s in enumerate(full["steps"]):
        assert_counts_follow_mixture(np.bincount(s["dataset_ids"], minlength=4), k)
    assert full["consumed_samples"] == 9 * B + 6 * 2 * B

    for stop in (4, 5):   # a stage boundary; inside s2's mixture warmup
        out = tmp_path / f"split{stop}"
        first = _run(tiny_data, out, [f"train.stop_at_step={stop}"])
        second = _run(tiny_data, out)
        resumed = first["steps"] + second["steps"]
        assert [s["step"] for s in resumed] == list(range(1, 16))
        for a, b in zip(full["steps"], resumed):
            assert abs(a["loss"] - b["loss"]) <= 1e-6, (stop, a["step"], a["loss"], b["loss"])
            assert a["lr"] == b["lr"] and a["dataset_ids"] == b["dataset_ids"]
            assert a["sample_ids"] == b["sample_ids"]
        assert second["stage_starts"] == full["stage_starts"]

    # TensorBoard: 1_train/stage steps to the next index where each stage begins.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tensorboard_dir(tmp_path / "full", "tiny")),
                           size_guidance={"scalars": 0})
    acc.Reload()
    stage_of_step = {e.step: int(e.value) for e in acc.Scalars("1_train/stage")}
    assert [stage_of_step[k] for k in (1, 4, 5, 9, 10, 15)] == [0, 0, 1, 1, 2, 2]

    # A resumed run may not move a stage that has begun (s2 began at step 4).
    from phoenix.testing.distributed import run_distributed
    from phoenix.testing.workers import train_and_record

    moved = recipe(tiny_data, tmp_path / "split5")
    moved["stages"][0]["steps"] = 3
    moved["stages"][0]["lr"][1]["steps"] = 1
    moved["stages"][1]["steps"] = 6
    moved["stages"][1]["lr"][0]["steps"] = 6
    with pytest.raises(Exception, match=r"began stage 's2' at step 4 but the config starts it at step 3"):
        run_distributed(train_and_record, 1, moved, [])


def test_lr_plot_marks_stages(tiny_data, tmp_path, capsys):
    import csv

    import yaml

    from phoenix.cli.lr_plot import main

    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe(tiny_data, tmp_path / "run")))
    assert main([str(path), "--out", str(tmp_path / "plot")]) == 0
    with open(tmp_path / "plot" / "lr.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["stage"] for r in rows] == ["s1"] * 4 + ["s2"] * 5 + ["s3"] * 6
    assert [r["phase"] for r in rows][3:5] == ["s1/constant", "s2/constant"]
    lrs = [float(r["lr"]) for r in rows]
    assert lrs[:4] == [0.0, 1.5e-3, 3e-3, 3e-3] and lrs[4:9] == [3e-3] * 5
    # s3: cosine from 3e-3 to 3e-4 over 6 steps, computed here
    want = [3e-4 + 0.5 * (1 + math.cos(math.pi * j / 6)) * (3e-3 - 3e-4) for j in range(6)]
    np.testing.assert_allclose(lrs[9:], want, rtol=1e-12)
    assert "s3" in capsys.readouterr().out
