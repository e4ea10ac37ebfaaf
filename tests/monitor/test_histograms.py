"""Weight and gradient histograms (``logging.histograms``), read back with TensorBoard's
own event reader and compared with torch on the full tensors of a single-process run.

The single-process reference keeps, at every step, the full weights and gradients of
every part (phoenix.testing.histogram_workers.FullTensors, a plain read of the model);
its histograms must equal ``torch.histc`` / sums of those tensors exactly. The TP=2,
PP=2 and DP=2 (distributed optimizer) runs start from the reference's initial weights
(warm-up starts at LR 0, so the logged weights are those initial weights at both steps):
their weight histograms must be bucket-for-bucket identical to the reference tensors',
their gradient histograms equal up to float rounding of the reductions.
"""

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from phoenix.config import ConfigError
from phoenix.config.monitoring import HistogramConfig
from phoenix.monitor.base import Histogram
from phoenix.monitor.histograms import bucket_limits, histogram_from_stats, select_keys
from phoenix.monitor.tensorboard import BackgroundWriter, tensorboard_dir

STEPS = 2
BINS = 16
PATTERNS = ["embedding", "output_layer", "final_norm", "layer_*/mlp/fc1",
            "layer_01/attention/*", "layer_03/norms"]
KEYS = ["embedding", "final_norm", "layer_00/mlp/fc1", "layer_01/attention/proj",
        "layer_01/attention/qkv", "layer_01/mlp/fc1", "layer_02/mlp/fc1", "layer_03/mlp/fc1",
        "layer_03/norms", "output_layer"]
# DP=2 with the distributed optimizer uses the same owned slices (phoenix.monitor.ownership)
# as the grad and optimizer-state norms, whose tests run it at DP=2 with and without it.
LAYOUTS = {
    "tp2": ["parallel.tensor=2"],
    "pp2": ["parallel.pipeline=2"],
}


def _read(folder: Path) -> dict[str, dict[int, object]]:
    """``{tag: {step: HistogramValue}}`` with TensorBoard's own reader."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder), size_guidance={"histograms": 0})  # 0: keep all
    acc.Reload()
    return {tag: {e.step: e.histogram_value for e in acc.Histograms(tag)}
            for tag in acc.Tags()["histograms"]}


def _expected(t: torch.Tensor) -> dict:
    """The histogram of the full tensor ``t``, computed directly."""
    lo, hi = float(t.min()), float(t.max())
    if hi > lo:
        counts = torch.histc(t, BINS, lo, hi).tolist()
        limits = np.linspace(lo, hi, BINS + 1)[1:].tolist()
    else:
        counts, limits = [float(t.numel())], [hi]
    d = t.double()
    return {"min": lo, "max": hi, "num": float(t.numel()), "sum": float(d.sum()),
            "sum_squares": float((d * d).sum()), "counts": counts, "limits": limits}


# -- fast ---------------------------------------------------------------------------
def test_patterns_select_keys_and_a_pattern_matching_nothing_is_one_line():
    keys = ["embedding", "layer_00/mlp/fc1", "layer_00/mlp/fc2", "layer_01/mlp/fc1",
            "output_layer"]
    assert select_keys(["layer_*/mlp/fc1", "embedding"], keys) == \
        ["embedding", "layer_00/mlp/fc1", "layer_01/mlp/fc1"]
    assert select_keys(["layer_00*"], keys) == ["layer_00/mlp/fc1", "layer_00/mlp/fc2"]
    with pytest.raises(ConfigError) as e:
        select_keys(["embedding", "layer_*/mlp/fc3"], keys)
    assert "\n" not in str(e.value)
    assert "'layer_*/mlp/fc3' matches no part" in str(e.value)
    # names the known keys, layer numbers folded: a 64-layer MoE model stays one line
    assert str(e.value).endswith("its keys: embedding, layer_*/mlp/fc1, layer_*/mlp/fc2, "
                                 "output_layer (layer_* = layer_00..layer_01)")


@pytest.mark.parametrize("section, problem", [
    ({"interval": 5}, "patterns"),
    ({"interval": -1, "patterns": ["embedding"]}, "interval"),
    ({"interval": 5, "patterns": "embedding"}, "patterns"),
    ({"interval": 5, "patterns": ["embedding"], "bins": 0}, "bins"),
])
def test_bad_histogram_config_is_refused(section, problem):
    with pytest.raises(ConfigError, match=f"logging.histograms.{problem}"):
        HistogramConfig(**section)
    assert HistogramConfig().interval == 0  # off by default


def test_histogram_from_stats_matches_numpy():
    values = torch.randn(1000, generator=torch.Generator().manual_seed(0))
    lo, hi = float(values.min()), float(values.max())
    counts = torch.histc(values, 10, lo, hi).tolist()
    h = histogram_from_stats(2 * lo, 2 * hi, 1000.0, float(values.sum()) * 2,
                             float((values.double() ** 2).sum()) * 4, counts, scale=2.0)
    numpy_counts, _ = np.histogram(values.numpy(), bins=10, range=(lo, hi))
    assert list(h.bucket_counts) == numpy_counts.tolist()
    np.testing.assert_allclose(h.bucket_edges, np.linspace(lo, hi, 11), rtol=1e-12)
    assert bucket_limits(lo, hi, 10)[-1] == hi
    assert h.sum == pytest.approx(float(values.sum()))
    const = histogram_from_stats(1.0, 1.0, 64.0, 64.0, 64.0, [0.0] * 10)
    assert const.bucket_limits == (1.0,) and const.bucket_counts == (64.0,)


def test_tensorboard_and_wandb_write_bucket_counts_as_given(tmp_path):
    from phoenix.monitor.wandb_sink import wandb_histogram

    h = Histogram(min=-1.0, max=3.0, num=6.0, sum=4.0, sum_squares=14.0,
                  bucket_limits=(1.0, 3.0), bucket_counts=(4.0, 2.0))
    writer = BackgroundWriter(str(tmp_path))
    writer.add_histogram("param_hist/embedding", h, 7)
    writer.close()
    got = _read(tmp_path)["param_hist/embedding"][7]
    assert (got.min, got.max, got.num, got.sum, got.sum_squares) == (-1.0, 3.0, 6.0, 4.0, 14.0)
    assert list(got.bucket_limit) == [1.0, 3.0] and list(got.bucket) == [4.0, 2.0]
    wb = wandb_histogram(h)
    assert list(wb.histogram) == [4, 2] and list(wb.bins) == [-1.0, 1.0, 3.0]


# -- slow: real multi-process runs ----------------------------------------------------
def _train(tiny_data, out: Path, world: int, overrides=(), full=False, **sections):
    from phoenix.testing.distributed import run_distributed
    from phoenix.testing.histogram_workers import train_with_histograms
    from phoenix.testing.tiny import tiny_config_dict

    cfg = tiny_config_dict(
        tiny_data, out, train={"steps": STEPS}, optim={"warmup_steps": 1, "lr": 3.0e-3},
        logging={"tensorboard": True, "log_interval": 1, "norm_interval": 0,
                 "dataset_loss_interval": 0, "throughput_interval": 0, "heatmap_every": 0,
                 "histograms": {"interval": 1, "patterns": PATTERNS, "bins": BINS}},
        **sections)
    results = run_distributed(train_with_histograms, world, cfg, list(overrides), full)
    return _read(tensorboard_dir(out, "tiny")), results


@pytest.fixture(scope="module")
def reference(tiny_data, tmp_path_factory):
    """One process; saves its initial weights (step_000000) for the layouts."""
    out = tmp_path_factory.mktemp("hist_ref")
    hists, (result,) = _train(tiny_data, out, 1, full=True,
                              checkpoint={"save_initial": True, "save_at_end": False})
    return out / "checkpoints" / "step_000000", hists, result


@pytest.fixture(scope="module")
def layout_runs(reference, tiny_data, tmp_path_factory):
    """Each layout trained once from the reference's initial weights (lazily, cached)."""
    cache = {}

    def run(name):
        if name not in cache:
            out = tmp_path_factory.mktemp(f"hist_{name}")
            cache[name] = _train(tiny_data, out, 2, LAYOUTS[name],
                                 checkpoint={"init_from": str(reference[0]),
                                             "save_at_end": False})
        return cache[name]

    return run


def _compare(got, want: dict, exact: bool, where: str) -> list[str]:
    bad = []
    rel = 0.0 if exact else 1e-4
    scale = math.sqrt(want["sum_squares"] * want["num"])  # bounds |sum| (Cauchy-Schwarz)
    if got.num != want["num"]:
        bad.append(f"{where}: num {got.num} != {want['num']}")
    for field in ("min", "max"):
        if not math.isclose(getattr(got, field), want[field], rel_tol=rel, abs_tol=0.0):
            bad.append(f"{where}: {field} {getattr(got, field)} != {want[field]}")
    if not math.isclose(got.sum_squares, want["sum_squares"], rel_tol=max(rel, 1e-6)):
        bad.append(f"{where}: sum_squares {got.sum_squares} != {want['sum_squares']}")
    if abs(got.sum - want["sum"]) > max(rel, 1e-6) * scale:
        bad.append(f"{where}: sum {got.sum} != {want['sum']}")
    counts = list(got.bucket)
    if exact and counts != want["counts"]:
        bad.append(f"{where}: counts {counts} != {want['counts']}")
    if not exact:  # grads differ in their last bits: a few values may cross a bucket edge
        moved = sum(abs(a - b) for a, b in zip(counts, want["counts"]))
        if len(counts) != len(want["counts"]) or moved > max(4, 1e-3 * want["num"]):
            bad.append(f"{where}: counts {counts} != {want['counts']}")
    if not np.allclose(list(got.bucket_limit), want["limits"], rtol=max(rel, 1e-12), atol=0):
        bad.append(f"{where}: bucket limits differ")
    return bad


def _check(hists, tensors, exact_grads: bool) -> None:
    assert sorted(hists) == sorted(f"{f}/{k}" for f in ("param_hist", "grad_hist") for k in KEYS)
    bad = []
    for step in range(1, STEPS + 1):
        for key in KEYS:
            weight, grad = tensors[step][key]
            bad += _compare(hists[f"param_hist/{key}"][step], _expected(weight), True,
                            f"param_hist/{key} step {step}")
            bad += _compare(hists[f"grad_hist/{key}"][step], _expected(grad), exact_grads,
                            f"grad_hist/{key} step {step}")
    assert not bad, f"{len(bad)} differences:\n" + "\n".join(bad[:20])


@pytest.mark.slow
def test_reference_histograms_equal_torch_on_the_full_tensors(reference):
    _, hists, result = reference
    _check(hists, result["tensors"], exact_grads=True)
    # Norm weights start all ones: one bucket; every step was written once.
    norms = hists["param_hist/layer_03/norms"][1]
    assert (norms.min, norms.max, list(norms.bucket)) == (1.0, 1.0, [norms.num])
    assert all(sorted(by_step) == [1, 2] for by_step in hists.values())


@pytest.mark.slow
@pytest.mark.parametrize("name", list(LAYOUTS))
def test_layout_histograms_equal_the_single_process_tensors(name, reference, layout_runs):
    _, _, ref = reference
    hists, results = layout_runs(name)
    assert results[0]["layout"].startswith("world=2")
    assert sum(r["is_logging_rank"] for r in results) == 1
    _check(hists, ref["tensors"], exact_grads=False)
