"""Spike detection: the running-window test, and end to end: one record per spiking step,
with the batch's provenance (equal to the data plan's), optional skipping, DP invariance."""

import json
import math
import random
from pathlib import Path

import pytest

from phoenix.config import ConfigError
from phoenix.config.monitoring import SpikeConfig
from phoenix.monitor.spikes import SpikeDetector, provenance, read_spikes, top_layers
from phoenix.monitor.tensorboard import tensorboard_dir

SPIKE_AT, STEPS, FACTOR = 6, 6, 20.0
# grad norms grow early in the tiny run (~1.0 -> 1.8 by step 5): rel_std_floor keeps that
# normal; the injected x20 loss (and gradient) at SPIKE_AT is far above any threshold.
SPIKES = dict(enabled=True, window=5, min_steps=4, loss_sigma=3.0, grad_norm_sigma=3.0,
              rel_std_floor=0.5, top_samples=3, top_layers=5)


# -- the detector on synthetic series ------------------------------------------------------
def _series(n, mean=3.0, noise=0.05, seed=0):
    rng = random.Random(seed)
    return [mean + rng.gauss(0.0, noise) for _ in range(n)]


def _flags(det, metric, values):
    return [i for i, v in enumerate(values) if det.observe(metric, v) is not None]


def test_steady_noisy_series_has_no_spike():
    det = SpikeDetector(window=50, min_steps=10, sigma={"loss": 5.0})
    assert _flags(det, "loss", _series(500)) == []


def test_spike_is_flagged_at_its_step_with_stats():
    values = _series(200)
    values[120] = 3.5
    det = SpikeDetector(window=50, min_steps=10, sigma={"loss": 5.0})
    hits = []
    for i, v in enumerate(values):
        s = det.observe("loss", v)
        if s is not None:
            hits.append((i, s))
    assert [i for i, _ in hits] == [120]
    s = hits[0][1]
    window = values[70:120]
    mean = sum(window) / 50
    std = math.sqrt(sum((x - mean) ** 2 for x in window) / 50)
    assert s["value"] == 3.5 and s["window"] == 50
    assert s["mean"] == pytest.approx(mean) and s["std"] == pytest.approx(std)
    assert s["threshold"] == pytest.approx(mean + 5.0 * std)
    # the spike was kept out of the window (exclude_spikes): the next value sees the old stats
    assert 3.5 not in det.values["loss"]


def test_min_steps_warm_up():
    values = _series(30)
    values[5], values[15] = 3.5, 10.0  # 3.5: ~10 sigma; in the warm-up it joins the window
    det = SpikeDetector(window=20, min_steps=10, sigma={"loss": 5.0})
    assert _flags(det, "loss", values) == [15]  # step 5 falls in the warm-up
    det = SpikeDetector(window=20, min_steps=5, sigma={"loss": 5.0})
    assert _flags(det, "loss", values) == [5, 15]


def test_loss_and_grad_norm_thresholds_are_independent():
    loss, grad = _series(60, seed=1), _series(60, mean=1.0, seed=2)
    loss[40] += 0.4   # ~8 sigma
    grad[50] += 0.4   # ~8 sigma
    det = SpikeDetector(window=30, min_steps=10, sigma={"loss": 5.0, "grad_norm": 5.0})
    assert _flags(det, "loss", loss) == [40] and _flags(det, "grad_norm", grad) == [50]
    det = SpikeDetector(window=30, min_steps=10, sigma={"loss": None, "grad_norm": 5.0})
    assert _flags(det, "loss", loss) == [] and _flags(det, "grad_norm", grad) == [50]
    det = SpikeDetector(window=30, min_steps=10, sigma={"loss": 5.0, "grad_norm": 20.0})
    assert _flags(det, "loss", loss) == [40] and _flags(det, "grad_norm", grad) == []


def test_non_finite_values_are_ignored():
    det = SpikeDetector(window=10, min_steps=3, sigma={"grad_norm": 3.0})
    assert _flags(det, "grad_norm", [1.0, 1.1, float("nan"), 0.9, float("inf"), 1.0]) == []
    assert len(det.values["grad_norm"]) == 4


def test_config_checks():
    SpikeConfig(**SPIKES)
    for bad in ({"min_steps": 1}, {"window": 5, "min_steps": 6}, {"loss_sigma": 0.0},
                {"grad_norm_sigma": -1.0}, {"skip_step": True, "loss_sigma": None}):
        with pytest.raises(ConfigError):
            SpikeConfig(**{**SPIKES, **bad})


def test_provenance_and_top_layers():
    rows = [{"dataset_id": d, "sample_id": s, "group_id": -1, "document_id": s,
             "loss_sum": l * 10, "tokens": 10, "loss": l}
            for d, s, l in [(0, 1, 2.0), (1, 7, 9.0), (0, 3, 5.0), (1, 2, 1.0)]]
    out = provenance(rows, ["web", "code"], top=2)
    assert out["dataset_counts"] == {"web": 2, "code": 2}
    assert [(s["dataset"], s["sample_id"]) for s in out["top_samples"]] == [("code", 7), ("web", 3)]
    last = {"grad_norm/layer_00": 1.0, "grad_norm/layer_01": 3.0, "grad_norm/layer_01/mlp/fc1": 9.0,
            "grad_norm/global": 10.0, "grad_norm/embedding": 2.0, "param_norm/layer_00": 99.0}
    assert top_layers(last, 2) == [{"name": "layer_01", "grad_norm": 3.0},
                                   {"name": "embedding", "grad_norm": 2.0}]


# -- end to end ------------------------------------------------------------------------------
def _plan_batch(run_dir, config_dict, k):
    """The plan's batch k, read from the run's data cache (independently of the monitor)."""
    from phoenix.config import build_config
    from phoenix.data.plan_source import load_or_build_plan
    from phoenix.data.plan_cache import run_stage_plans

    cfg = build_config(config_dict)
    [(_, plan)] = run_stage_plans(cfg, lambda inputs: load_or_build_plan(
        inputs, Path(run_dir) / "data_cache", build=False)[0])
    ds, ss = plan.batch(k)
    return plan, {name: int(plan.counts[k, d]) for d, name in enumerate(plan.names)}, \
        sorted(zip(ds.tolist(), ss.tolist()))


def _expected_top(rows, n):
    ranked = sorted(rows, key=lambda r: -r["loss_sum"] / r["tokens"])
    return [(r["dataset_id"], r["sample_id"]) for r in ranked[:n]]


@pytest.fixture(scope="module")
def single_run(tiny_data, tmp_path_factory):
    from phoenix.testing.distributed import run_distributed
    from phoenix.testing.tiny import tiny_config_dict
    from phoenix.testing.workers import train_with_spike

    run_dir = tmp_path_factory.mktemp("spike_single")
    cfg = tiny_config_dict(tiny_data, run_dir, train={"steps": STEPS},
                           logging={"tensorboard": True, "norm_interval": 1})
    (result,) = run_distributed(train_with_spike, 1, cfg, {**SPIKES, "skip_step": True}, [],
                                SPIKE_AT, FACTOR)
    return run_dir, cfg, result


@pytest.mark.slow
def test_spike_record_single_process_with_skip(single_run):
    run_dir, cfg, result = single_run
    records = read_spikes(run_dir / "spikes.jsonl")
    assert [r["step"] for r in records] == [SPIKE_AT], records
    (rec,) = records
    assert rec == json.loads(json.dumps(result["records"][0]))
    assert set(rec["spikes"]) == {"loss"}  # skipped: no grad norm, so only the loss
    s = rec["spikes"]["loss"]
    assert s["window"] == SPIKE_AT - 1 and s["value"] > s["threshold"]
    losses = [st["loss"] for st in result["steps"][:SPIKE_AT - 1]]
    assert s["mean"] == pytest.approx(sum(losses) / len(losses))
    assert rec["skipped"] is True and rec["skip_reason"] == "loss spike"
    assert rec["top_layers"] is None and "skipped" in rec["top_layers_note"]

    # provenance: the plan's batch SPIKE_AT-1, and the highest per-sample losses
    _, counts, members = _plan_batch(run_dir, cfg, SPIKE_AT - 1)
    assert rec["dataset_counts"] == {k: v for k, v in counts.items() if v}
    rows = result["report_rows"]
    assert sorted((r["dataset_id"], r["sample_id"]) for r in rows) == members
    assert [(t["dataset_id"], t["sample_id"]) for t in rec["top_samples"]] == \
        _expected_top(rows, SPIKES["top_samples"])
    for t in rec["top_samples"]:
        assert t["loss"] == pytest.approx(t["loss_sum"] / t["tokens"])

    # the update was skipped: weights unchanged across the step, counted once
    flags = [st["skipped"] for st in result["steps"]]
    assert flags == [st == SPIKE_AT for st in range(1, STEPS + 1)]
    sums = [st["param_sum"] for st in result["steps"]]
    assert sums[SPIKE_AT - 1] == sums[SPIKE_AT - 2] and sums[SPIKE_AT - 2] != sums[SPIKE_AT - 3]
    assert result["skipped"] == 1 and result["count"] == 1

    # TensorBoard: spikes/count and 1_train/skipped_steps
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tensorboard_dir(run_dir, "tiny")), size_guidance={"scalars": 0})
    acc.Reload()
    count = {e.step: e.value for e in acc.Scalars("spikes/count")}
    assert count == {st: float(st >= SPIKE_AT) for st in range(1, STEPS + 1)}
    assert acc.Scalars("1_train/skipped_steps")[-1].value == 1

    # the batch inspector lists those very samples for the same 1-based step
    from phoenix.cli.inspect_batch import batch_samples

    shown = batch_samples(run_dir, SPIKE_AT)
    by_id = {(s["dataset_id"], s["sample_id"]): s for s in shown["samples"]}
    for t in rec["top_samples"]:
        assert t["document_id"] == by_id[(t["dataset_id"], t["sample_id"])]["document_ids"][0]


@pytest.mark.slow
def test_spike_record_dp2_matches_single_process(single_run, tiny_data, tmp_path):
    from phoenix.testing.distributed import run_distributed
    from phoenix.testing.tiny import tiny_config_dict
    from phoenix.testing.workers import train_with_spike

    _, _, single = single_run
    cfg = tiny_config_dict(tiny_data, tmp_path / "dp2", train={"steps": STEPS})
    results = run_distributed(train_with_spike, 2, cfg, SPIKES, [], SPIKE_AT, FACTOR)
    records = read_spikes(tmp_path / "dp2" / "spikes.jsonl")
    assert [r["step"] for r in records] == [SPIKE_AT]
    assert [len(r["records"]) for r in results] == [1, 0]  # the logging rank writes
    (rec,), ref = records, single["records"][0]
    assert rec["skipped"] is False
    assert set(rec["spikes"]) == {"loss", "grad_norm"}  # not skipped: the grad norm spikes too
    assert rec["spikes"]["grad_norm"]["value"] == pytest.approx(rec["grad_norm"])
    assert rec["spikes"]["loss"]["value"] == pytest.approx(ref["spikes"]["loss"]["value"], rel=1e-5)
    assert rec["dataset_counts"] == ref["dataset_counts"]
    key = lambda t: (t["dataset"], t["sample_id"], t["group_id"], t["document_id"], t["tokens"])
    assert [key(t) for t in rec["top_samples"]] == [key(t) for t in ref["top_samples"]]
    for a, b in zip(rec["top_samples"], ref["top_samples"]):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
    # the gathered global batch: both ranks' reports together
    rows = results[0]["report_rows"] + results[1]["report_rows"]
    assert sorted((r["dataset_id"], r["sample_id"]) for r in rows) == \
        sorted((r["dataset_id"], r["sample_id"]) for r in single["report_rows"])
    assert [(t["dataset_id"], t["sample_id"]) for t in rec["top_samples"]] == \
        _expected_top(rows, SPIKES["top_samples"])
    # the NormMonitor logged this (not skipped) step: its largest layers are listed
    layers = rec["top_layers"]
    assert len(layers) == SPIKES["top_layers"]
    assert [l["grad_norm"] for l in layers] == sorted((l["grad_norm"] for l in layers), reverse=True)
    assert rec["grad_norm_global_unclipped"] == pytest.approx(rec["grad_norm"], rel=1e-4)
