"""The heatmap images: phoenix's PNG encoder against PIL's decoder, the colour ramp, and
the images written through the TensorBoard sink, read back with TensorBoard's own
EventAccumulator and decoded by PIL, against the norms and loads the test put in."""

import io
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from phoenix.monitor.base import MetricsCollector
from phoenix.monitor.heatmap import (History, HeatmapMonitor, cell_size, colorize, encode_png,
                                     render)
from phoenix.monitor.tensorboard import TensorBoardLogger

Image = pytest.importorskip("PIL.Image")


def _decode(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))


def _luminance(rgb: np.ndarray) -> np.ndarray:
    return rgb[..., 0] * 0.299 + rgb[..., 1] * 0.587 + rgb[..., 2] * 0.114


def _cells(image: np.ndarray, rows: int, columns: int) -> np.ndarray:
    """Mean luminance of each cell of a rendered ``rows x columns`` heatmap."""
    h, w = cell_size(rows, columns)
    assert image.shape == (rows * h, columns * w, 3)
    return _luminance(image.astype(np.float64)).reshape(rows, h, columns, w).mean(axis=(1, 3))


def test_png_encoder_round_trips_through_pil():
    rgb = np.random.default_rng(0).integers(0, 256, size=(7, 13, 3), dtype=np.uint8)
    assert np.array_equal(_decode(encode_png(rgb)), rgb)


def test_brightness_rises_with_the_value():
    values = np.linspace(-3.0, 2.0, 101)[None, :]
    lum = _luminance(colorize(values, -3.0, 2.0).astype(np.float64))[0]
    assert np.all(np.diff(lum) > 0)
    assert tuple(colorize(np.array([[np.nan]]), 0, 1)[0, 0]) == (128, 128, 128)
    image = render(np.zeros((2, 3)), 0.0, 1.0)
    assert image.shape == (2 * 16, 3 * 16, 3)  # small grids are drawn as blocks of pixels


def test_history_halves_its_resolution_past_max_columns():
    history = History(max_columns=4)
    for step in range(1, 6):
        history.add(step, {0: float(step), 1: 10.0 * step})
    rows, values = history.matrix()
    assert rows == [0, 1] and history.steps == [2, 4, 5]
    assert values.tolist() == [[1.5, 3.5, 5.0], [15.0, 35.0, 50.0]]


def _trainer(last_step):
    return SimpleNamespace(layout=SimpleNamespace(is_logging_rank=True),
                           state=SimpleNamespace(step=0), metrics=None, last_step=last_step)


def _run(tmp_path, steps, record, every):
    """Run the heatmap monitor and the TensorBoard sink over ``steps`` collectors filled
    by ``record(collector)``; returns the monitor and the event folder."""
    trainer = _trainer(steps)
    heatmaps, tb = HeatmapMonitor(every, tmp_path / "heatmaps"), TensorBoardLogger(tmp_path / "tb")
    tb.on_train_start(trainer)
    for step in range(1, steps + 1):
        trainer.metrics = MetricsCollector(step, last_step=steps)
        record(trainer.metrics)
        heatmaps.on_step_end(trainer, None)
        tb.log_metrics(trainer, trainer.metrics)
    tb.on_train_end(trainer)
    return heatmaps, tmp_path / "tb"


def _images(log_dir) -> dict:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"images": 0})
    acc.Reload()
    return {tag: [(e.step, _decode(e.encoded_image_string)) for e in acc.Images(tag)]
            for tag in acc.Tags()["images"]}


def test_layer_norm_heatmaps_show_the_larger_norm_brighter(tmp_path):
    # Layer 2's gradient is 100x the others'; layer 0's grows 10x per step.
    def grad(layer, step):
        return {0: 1e-3 * 10 ** (step - 1), 1: 1e-3, 2: 1e-1}[layer]

    def record(metrics):
        for layer in range(3):
            metrics.record(f"grad_norm/layer_{layer:02d}", grad(layer, metrics.step))
            metrics.record(f"param_norm/layer_{layer:02d}", 5.0 - layer)
            metrics.record(f"grad_norm/layer_{layer:02d}/mlp/fc1", 123.0)  # a part: no row
        metrics.record("grad_norm/global", 1.0)

    monitor, log_dir = _run(tmp_path, 3, record, every=2)
    images = _images(log_dir)
    assert sorted(images) == ["4_heatmaps/grad_norm", "4_heatmaps/param_norm"]
    assert [step for step, _ in images["4_heatmaps/grad_norm"]] == [2, 3]  # every 2nd, last
    step, image = images["4_heatmaps/grad_norm"][-1]
    cells = _cells(image, 3, 3)
    assert cells[2, 0] > cells[1, 0]  # the larger norm is brighter, at the same step
    assert cells[0, 2] > cells[0, 1] > cells[0, 0]  # a growing norm brightens to the right
    assert np.allclose(cells[1], cells[1, 0])  # a constant norm keeps its colour
    lo, hi = monitor.last["4_heatmaps/grad_norm"]
    assert math.isclose(lo, -3.0) and math.isclose(hi, -1.0)  # log10 of min and max
    params = _cells(images["4_heatmaps/param_norm"][-1][1], 3, 3)
    assert params[0, 0] > params[1, 0] > params[2, 0]
    # The PNG file holds the latest image.
    assert np.array_equal(_decode((tmp_path / "heatmaps" / "grad_norm.png").read_bytes()), image)


def test_moe_load_heatmaps_show_the_hot_expert(tmp_path):
    num_experts = 4

    def record(metrics):
        for layer, hot in ((1, 3), (3, 0)):  # MoE layers 1 and 3
            counts = torch.ones(num_experts)
            counts[hot] = 5.0 * metrics.step
            metrics.record_histogram(f"moe/layer_{layer:02d}/tokens_per_expert",
                                     counts / counts.sum())

    monitor, log_dir = _run(tmp_path, 2, record, every=1)
    images = _images(log_dir)
    assert sorted(images) == ["4_heatmaps/moe_load", "4_heatmaps/moe_load/layer_01",
                              "4_heatmaps/moe_load/layer_03"]
    by_step = _cells(images["4_heatmaps/moe_load/layer_01"][-1][1], num_experts, 2)
    assert by_step[3].min() > by_step[:3].max()  # expert 3 of layer 1 is the hot one
    assert by_step[3, 1] > by_step[3, 0]  # and hotter at step 2
    grid = _cells(images["4_heatmaps/moe_load"][-1][1], 2, num_experts)
    assert grid[0].argmax() == 3 and grid[1].argmax() == 0
    lo, hi = monitor.last["4_heatmaps/moe_load"]
    assert lo == 0.0 and math.isclose(hi, 10.0 / 13.0 * num_experts, rel_tol=1e-6)
    assert (tmp_path / "heatmaps" / "moe_load_layer_03.png").is_file()


def test_nothing_is_drawn_off_the_logging_rank(tmp_path):
    trainer = _trainer(1)
    trainer.layout.is_logging_rank = False
    trainer.metrics = MetricsCollector(1, last_step=1)
    trainer.metrics.record("grad_norm/layer_00", 1.0)
    monitor = HeatmapMonitor(1, tmp_path / "heatmaps")
    monitor.on_step_end(trainer, None)
    assert not trainer.metrics.images and not (tmp_path / "heatmaps").exists()


@pytest.mark.slow
def test_a_training_run_draws_its_layer_norms(tiny_data, tmp_path):
    """A real run: the grad-norm heatmap's cells order as the run's own per-layer
    ``grad_norm/layer_XX`` scalars in the same event file."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from phoenix.monitor.tensorboard import tensorboard_dir
    from phoenix.testing.distributed import run_distributed
    from phoenix.testing.tiny import tiny_config_dict
    from phoenix.testing.workers import train_and_record

    steps = 3
    cfg = tiny_config_dict(tiny_data, tmp_path, train={"steps": steps},
                           logging={"tensorboard": True, "log_interval": 1, "heatmap_every": 2})
    run_distributed(train_and_record, 1, cfg)
    acc = EventAccumulator(str(tensorboard_dir(tmp_path, "tiny")),
                           size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    images = acc.Images("4_heatmaps/grad_norm")
    assert [e.step for e in images] == [2, 3]
    layers = sorted(t for t in acc.Tags()["scalars"]
                    if t.startswith("grad_norm/layer_") and t.count("/") == 1)
    want = np.array([[math.log10(e.value) for e in acc.Scalars(t)] for t in layers])
    assert want.shape == (len(layers), steps)
    cells = _cells(_decode(images[-1].encoded_image_string), len(layers), steps)
    span = want.max() - want.min()
    for a in np.ndindex(want.shape):
        for b in np.ndindex(want.shape):
            if want[a] - want[b] > 0.05 * span:  # clearly larger: clearly brighter
                assert cells[a] > cells[b], (a, b, want, cells)
    assert (tmp_path / "heatmaps" / "update_ratio.png").is_file()
    # TensorBoard lays groups out alphabetically: the basics come first, before the
    # per-layer families (phoenix.monitor.tags).
    groups = sorted({t.split("/")[0] for t in acc.Tags()["scalars"] + acc.Tags()["images"]})
    assert groups[:4] == ["1_train", "2_datasets", "3_throughput", "4_heatmaps"], groups
    assert {"grad_norm", "param_norm", "update_norm", "update_ratio"} <= set(groups[4:])
