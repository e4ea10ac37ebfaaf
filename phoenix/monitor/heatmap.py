"""Per-layer norms and MoE load as heatmap images: layer x step, expert x step, layer x expert.

Twenty-eight ``grad_norm/layer_XX`` curves are hard to read side by side; one image with a
row per layer and a column per logged step shows at a glance which layer grows and when.
:class:`HeatmapMonitor` reads what the producers recorded into the step's metrics
collector (the whole-layer norms of the :class:`~phoenix.monitor.norms.NormMonitor` and
the :class:`~phoenix.monitor.optimizer_state.OptimizerStateNormMonitor`, the
:class:`~phoenix.monitor.moe.MoEMonitor`'s ``tokens_per_expert`` histograms), keeps their
history on the logging rank, and every ``every``-th step that brought new values (and at
the run's last step) records these images (RGB, written by the TensorBoard sink with
``add_image``) and writes the same as PNG files under ``<output_dir>/heatmaps/``:

=====================================  ==========================  ================================
tag (``heatmaps/`` file)               rows x columns              colour (dark -> bright)
=====================================  ==========================  ================================
``4_heatmaps/grad_norm``               layer x logged step         log10 of the layer's grad norm
``4_heatmaps/param_norm``              layer x logged step         log10 of the param norm
``4_heatmaps/update_norm``             layer x logged step         log10 of the update norm
``4_heatmaps/update_ratio``            layer x logged step         log10 of update / param
``4_heatmaps/adam_m_norm``             layer x logged step         log10 of Adam's ‖m‖
``4_heatmaps/adam_v_norm``             layer x logged step         log10 of Adam's ‖v‖
``4_heatmaps/adam_direction_norm``     layer x logged step         log10 of ‖m̂ / (√v̂ + ε)‖
``4_heatmaps/moe_load/layer_07``       expert x logged step        expert's load, share x E
``4_heatmaps/moe_load``                MoE layer x expert          the same, latest logged step
=====================================  ==========================  ================================

Layer 0 (next to the embedding) is the top row, the oldest step the left column; file names
replace ``/`` by ``_`` (``heatmaps/moe_load_layer_07.png``). Each image is scaled to its own
range (the text ``4_heatmaps/scale`` gives it, per image): norms on a log10 scale, because
layers differ by orders of magnitude; MoE load linearly from 0 to the image's maximum, where
1.0 is a perfectly balanced expert. A missing value (an update ratio of all-zero weights) is
mid grey. At most ``max_columns`` columns are kept: past that, neighbouring columns are
averaged in pairs (the whole run stays visible, at half the time resolution). Each cell is
drawn as a block of pixels, so a small model's image is not a few pixels wide.

The colours are an own dark-blue -> teal -> yellow ramp whose luminance rises monotonically
(so "brighter" reads as "larger" in grey scale too); the PNG encoder is numpy + zlib, so
neither matplotlib nor PIL is needed at run time. The history starts with the job: after a
resume the PNG files show the steps since the resume (TensorBoard keeps earlier images).
Nothing is communicated: the monitor only reads the logging rank's recorded values.
"""

from __future__ import annotations

import math
import os
import re
import struct
import zlib
from pathlib import Path

import numpy as np

from phoenix.monitor.base import Callback, StepMetrics
from phoenix.monitor.optimizer_state import FAMILIES as OPTIMIZER_STATE_FAMILIES
from phoenix.monitor.tags import HEATMAPS as TAG

NORM_FAMILIES = ("grad_norm", "param_norm", "update_norm", "update_ratio",
                 *OPTIMIZER_STATE_FAMILIES)
_LAYER_TAG = re.compile(rf"^({'|'.join(NORM_FAMILIES)})/layer_(\d+)$")
_MOE_TAG = re.compile(r"^moe/layer_(\d+)/tokens_per_expert$")

# Ramp anchors (RGB), darkest first; their luminance 0.299 R + 0.587 G + 0.114 B rises
# 14 -> 50 -> 108 -> 164 -> 226, so the brightness of a pixel orders the values.
_ANCHORS = np.array([[20, 10, 60], [60, 40, 140], [30, 140, 160], [120, 200, 90],
                     [250, 240, 80]], dtype=np.float64)
MISSING = (128, 128, 128)


def colorize(values: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """``uint8 [R, C, 3]`` colours of ``values [R, C]`` on the ramp, ``lo`` darkest and
    ``hi`` brightest (clipped); NaN is :data:`MISSING`. ``hi == lo`` draws the middle."""
    values = np.asarray(values, dtype=np.float64)
    span = hi - lo
    t = np.clip((values - lo) / span, 0.0, 1.0) if span > 0 else np.full(values.shape, 0.5)
    pos = np.nan_to_num(t) * (len(_ANCHORS) - 1)
    i = np.minimum(pos.astype(np.int64), len(_ANCHORS) - 2)
    frac = (pos - i)[..., None]
    rgb = _ANCHORS[i] * (1 - frac) + _ANCHORS[i + 1] * frac
    rgb[np.isnan(values)] = MISSING
    return np.rint(rgb).astype(np.uint8)


def cell_size(rows: int, columns: int, height: int = 256, width: int = 512,
              largest: int = 16) -> tuple[int, int]:
    """Pixels per cell (height, width): about ``height`` x ``width`` pixels in all, at most
    ``largest`` and at least 1 per cell side."""
    return (max(1, min(largest, height // max(rows, 1))),
            max(1, min(largest, width // max(columns, 1))))


def render(values: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """The heatmap of ``values [R, C]`` as ``uint8 [R * h, C * w, 3]``, each cell a block of
    :func:`cell_size` pixels."""
    h, w = cell_size(*np.shape(values))
    return np.repeat(np.repeat(colorize(values, lo, hi), h, axis=0), w, axis=1)


def encode_png(rgb: np.ndarray) -> bytes:
    """An 8-bit RGB PNG of ``uint8 [H, W, 3]`` (no filtering, zlib-compressed)."""
    rgb = np.ascontiguousarray(rgb, dtype=np.uint8)
    height, width, channels = rgb.shape
    if channels != 3:
        raise ValueError(f"encode_png: expected [H, W, 3], got {rgb.shape}")

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))

    raw = np.concatenate([np.zeros((height, 1), np.uint8), rgb.reshape(height, -1)], axis=1)
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8 bit, truecolour
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
            + chunk(b"IDAT", zlib.compress(raw.tobytes(), 6)) + chunk(b"IEND", b""))


def write_png(path: str | Path, rgb: np.ndarray) -> None:
    """Write ``rgb`` to ``path`` atomically (a reader never sees half a file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(encode_png(rgb))
    os.replace(tmp, path)


class History:
    """Columns of values by row key over logged steps, at most ``max_columns`` of them:
    past that, neighbouring columns are averaged in pairs (NaN-aware), halving the time
    resolution and keeping the whole run."""

    def __init__(self, max_columns: int = 256):
        if max_columns < 2:
            raise ValueError(f"History: max_columns must be >= 2, got {max_columns}")
        self.max_columns = max_columns
        self.steps: list[int] = []
        self.columns: list[dict[int, float]] = []

    def add(self, step: int, column: dict[int, float]) -> None:
        self.steps.append(step)
        self.columns.append(dict(column))
        if len(self.columns) > self.max_columns:
            merged_steps, merged = [], []
            for i in range(0, len(self.columns) - 1, 2):
                a, b = self.columns[i], self.columns[i + 1]
                merged.append({k: _mean(a.get(k), b.get(k)) for k in a.keys() | b.keys()})
                merged_steps.append(self.steps[i + 1])  # a merged column ends at its later step
            if len(self.columns) % 2:
                merged.append(self.columns[-1])
                merged_steps.append(self.steps[-1])
            self.steps, self.columns = merged_steps, merged

    def matrix(self) -> tuple[list[int], np.ndarray]:
        """(row keys in order, ``float64 [rows, columns]``, NaN where a column lacks a row)."""
        rows = sorted(set().union(*self.columns)) if self.columns else []
        out = np.full((len(rows), len(self.columns)), np.nan)
        for j, column in enumerate(self.columns):
            for i, key in enumerate(rows):
                out[i, j] = column.get(key, np.nan)
        return rows, out

    def __len__(self) -> int:
        return len(self.columns)


def _mean(a: float | None, b: float | None) -> float:
    values = [v for v in (a, b) if v is not None and not math.isnan(v)]
    return sum(values) / len(values) if values else math.nan


def _log10(value: float) -> float:
    return math.log10(value) if value > 0 and math.isfinite(value) else math.nan


def _range(values: np.ndarray) -> tuple[float, float]:
    finite = values[np.isfinite(values)]
    return (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)


class HeatmapMonitor(Callback):
    """Records the heatmap images of the module docstring and writes their PNG files.

    ``every``: render at every ``every``-th step that recorded per-layer norms (or MoE
    loads), and at the run's last step; ``out_dir``: the folder of the PNG files (None:
    TensorBoard only); ``max_columns``: the steps kept per image (see :class:`History`).
    Only the logging rank does anything. After a render, ``last`` maps each tag to its
    ``(lo, hi)`` colour range (log10 for norms).
    """

    # After every producer (norms record after the optimizer step, MoE at 450), before
    # the TensorBoard sink (-1000) that writes the images.
    priority = 200

    def __init__(self, every: int, out_dir: str | Path | None = None, max_columns: int = 256):
        if every < 1:
            raise ValueError(f"HeatmapMonitor: every must be >= 1, got {every}")
        self.every, self.max_columns = every, max_columns
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.norms = {family: History(max_columns) for family in NORM_FAMILIES}
        # MoE layer (its tag key, e.g. "07") -> experts x steps (share x E), latest loads
        self.moe: dict[str, History] = {}
        self.moe_latest: dict[str, np.ndarray] = {}
        self.last: dict[str, tuple[float, float]] = {}
        self._seen = {"norms": 0, "moe": 0}

    def on_step_end(self, trainer, m: StepMetrics) -> None:
        if not trainer.layout.is_logging_rank:
            return
        metrics = trainer.metrics
        last_step = metrics.last_step is not None and metrics.step == metrics.last_step
        if self._collect_norms(metrics) and (self._seen["norms"] % self.every == 0 or last_step):
            self._render_norms(metrics)
        if self._collect_moe(metrics) and (self._seen["moe"] % self.every == 0 or last_step):
            self._render_moe(metrics)

    # -- history ----------------------------------------------------------------------
    def _collect_norms(self, metrics) -> bool:
        columns: dict[str, dict[int, float]] = {}
        for tag, value in metrics.scalars.items():
            match = _LAYER_TAG.match(tag)
            if match:
                columns.setdefault(match.group(1), {})[int(match.group(2))] = _log10(value)
        for family, column in columns.items():
            self.norms[family].add(metrics.step, column)
        self._seen["norms"] += bool(columns)
        return bool(columns)

    def _collect_moe(self, metrics) -> bool:
        found = False
        for tag, shares in metrics.histograms.items():
            match = _MOE_TAG.match(tag)
            if match:
                layer, load = match.group(1), shares.double().numpy() * shares.numel()
                self.moe_latest[layer] = load
                history = self.moe.setdefault(layer, History(self.max_columns))
                history.add(metrics.step, dict(enumerate(load.tolist())))
                found = True
        self._seen["moe"] += found
        return found

    # -- images -----------------------------------------------------------------------
    def _emit(self, metrics, name: str, values: np.ndarray, lo: float, hi: float,
              scale: str) -> None:
        image = render(values, lo, hi)
        tag = f"{TAG}/{name}"
        metrics.record_image(tag, image)
        self.last[tag] = (lo, hi)
        self._scales.append(f"{tag}: {scale} from {lo:.4g} (dark) to {hi:.4g} (bright)")
        if self.out_dir is not None:
            write_png(self.out_dir / (name.replace("/", "_") + ".png"), image)

    def _render_norms(self, metrics) -> None:
        self._scales = []
        for family, history in self.norms.items():
            if not len(history):
                continue
            layers, values = history.matrix()
            lo, hi = _range(values)
            self._emit(metrics, family, values, lo, hi,
                       f"log10, rows layer {layers[0]}..{layers[-1]}, columns steps "
                       f"{history.steps[0]}..{history.steps[-1]},")
        self._record_scales(metrics)

    def _render_moe(self, metrics) -> None:
        self._scales = []
        for layer, history in sorted(self.moe.items(), key=lambda kv: int(kv[0])):
            experts, values = history.matrix()
            hi = max(_range(values)[1], 1e-12)
            self._emit(metrics, f"moe_load/layer_{layer}", values, 0.0, hi,
                       f"share x E, rows expert {experts[0]}..{experts[-1]}, columns steps "
                       f"{history.steps[0]}..{history.steps[-1]},")
        layers = sorted(self.moe_latest, key=int)
        width = max(len(v) for v in self.moe_latest.values())
        grid = np.full((len(layers), width), np.nan)
        for i, layer in enumerate(layers):
            grid[i, :len(self.moe_latest[layer])] = self.moe_latest[layer]
        self._emit(metrics, "moe_load", grid, 0.0, max(float(np.nanmax(grid)), 1e-12),
                   f"share x E at step {metrics.step}, rows MoE layers "
                   f"{', '.join(layers)}, columns experts,")
        self._record_scales(metrics)

    def _record_scales(self, metrics) -> None:
        previous = metrics.texts.get(f"{TAG}/scale")
        text = "\n\n".join(self._scales)
        metrics.record_text(f"{TAG}/scale", f"{previous}\n\n{text}" if previous else text)
