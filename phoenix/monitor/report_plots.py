"""The run report's figures, drawn with matplotlib (Agg: no display) into PNG files.

Two kinds: :func:`lines` (curves of one or more runs against the optimizer step and, in a
second panel with the same y axis, against consumed tokens, so runs with different batch
sizes line up by data seen; stage boundaries as solid vertical lines, spikes as marks)
and :func:`layer_heatmap` (a per-layer family as layer x logged step, on the colour ramp
of the TensorBoard heatmaps, :func:`phoenix.monitor.heatmap.colorize`, so a layer reads
the same on both). The caller passes plain lists; what is drawn is exactly what it
passes (and writes to report.json).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from phoenix.io import atomic_write
from phoenix.monitor.heatmap import colorize

STAGE_COLOR = "tab:red"
SPIKE_COLOR = "crimson"
SKIP_COLOR = "0.6"


def pyplot():
    """matplotlib's pyplot on the Agg backend; ImportError when matplotlib is missing."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    plt = pyplot()
    try:
        atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=110))
    finally:
        plt.close(fig)


def lines(path: Path, title: str, ylabel: str, curves: list[dict], stages: list[dict] = (),
          marks: list[dict] = (), log_y: bool = False, outliers: set = frozenset(),
          skipped: list[dict] = ()) -> None:
    """Curves ``{"run", "label", "steps", "tokens" (or None), "values", "color",
    "linestyle"}``; ``stages`` ``{"name", "step", "tokens", "color"}`` (x of the boundary
    on each axis); ``marks`` ``{"step", "tokens", "value", "text"}`` (spikes); ``skipped``
    ``{"step", "tokens"}``: steps ``train.skip_batches`` skipped, a grey band over the step
    (a line at its tokens: it consumed none).
    Non-finite values are gaps. ``outliers``: ``(run, step)`` points left out of the y
    range (a x20 loss spike would flatten the rest of the curve): they run off the top,
    and a mark there gives the value."""
    plt = pyplot()
    top = _y_top(curves, outliers) if outliers and not log_y else None
    by_tokens = any(c.get("tokens") is not None for c in curves)
    fig, axes = plt.subplots(1, 2 if by_tokens else 1, figsize=(13 if by_tokens else 8, 4.2),
                             sharey=True, squeeze=False)
    panels = [("steps", axes[0][0], "optimizer step")]
    if by_tokens:
        panels.append(("tokens", axes[0][1], "consumed tokens"))
    for key, ax, xlabel in panels:
        for c in curves:
            if c.get(key) is None:
                continue
            y = np.array([np.nan if v is None else v for v in c["values"]], dtype=np.float64)
            ax.plot(c[key], y, color=c.get("color"), ls=c.get("linestyle", "-"), lw=1.4,
                    marker="." if len(y) <= 60 else None, ms=4, label=c["label"])
        for s in stages:
            x = s.get("step" if key == "steps" else "tokens")
            if x is None:
                continue
            ax.axvline(x, color=s.get("color", STAGE_COLOR), lw=1.1, alpha=0.8)
            ax.annotate(f" {s['name']}", (x, 1.0), xycoords=("data", "axes fraction"),
                        ha="left", va="top", fontsize=8, color=s.get("color", STAGE_COLOR),
                        rotation=90)
        for k in skipped:
            x = k.get("step" if key == "steps" else "tokens")
            if x is None:
                continue
            if key == "steps":
                ax.axvspan(x - 0.5, x + 0.5, color=SKIP_COLOR, alpha=0.35, lw=0, zorder=0)
            else:
                ax.axvline(x, color=SKIP_COLOR, lw=2.5, alpha=0.6, zorder=0)
        for m in marks:
            x = m.get("step" if key == "steps" else "tokens")
            if x is None or m.get("value") is None or not math.isfinite(m["value"]):
                continue
            y, text = m["value"], m["text"]
            if top is not None and y > top[1]:
                y, text = top[1], f"{text}: {m['value']:.4g}"
            ax.plot([x], [y], marker="v", ms=9, color=SPIKE_COLOR, ls="none", zorder=5,
                    clip_on=False)
            ax.annotate(text, (x, y), textcoords="offset points", xytext=(6, -4),
                        fontsize=8, color=SPIKE_COLOR)
        if log_y:
            ax.set_yscale("log")
        elif top is not None:
            ax.set_ylim(*top)
        ax.set_xlabel(xlabel)
        if key == "steps":
            from matplotlib.ticker import MaxNLocator

            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel(ylabel)
    if marks:  # one legend entry for the spike marks
        axes[0][0].plot([], [], marker="v", ls="none", color=SPIKE_COLOR, label="spike")
    if skipped:
        axes[0][0].fill_between([], [], color=SKIP_COLOR, alpha=0.35, label="skipped batch")
    axes[0][0].legend(fontsize=8, loc="best")
    fig.suptitle(title)
    fig.tight_layout()
    _save(fig, path)


def _y_top(curves: list[dict], outliers: set) -> tuple[float, float] | None:
    """The y range of the curves' finite values, outliers left out, with a margin."""
    kept = [v for c in curves for s, v in zip(c["steps"], c["values"])
            if v is not None and math.isfinite(v) and (c.get("run"), s) not in outliers]
    if not kept:
        return None
    lo, hi = min(kept), max(kept)
    pad = 0.08 * (hi - lo) if hi > lo else 0.05 * abs(hi) or 1.0
    return lo - pad, hi + 2 * pad


def layer_heatmap(path: Path, title: str, layers: list[int], steps: list[int],
                  values: np.ndarray, log: bool, spike_steps: list[int] = (),
                  xlabel: str = "optimizer step", unit: str = "value",
                  vrange: tuple[float, float] | None = None) -> tuple[float, float]:
    """Layer x step image of ``values [layers, steps]`` (layer 0 the top row); colours from
    log10 of the values when ``log``; spike steps marked above the image. ``steps`` may be
    other columns (experts), named by ``xlabel``. ``vrange``: the colour range in the
    plotted unit (default: these values' own). Returns the colour range (lo, hi) used."""
    plt = pyplot()
    from matplotlib.colors import ListedColormap, Normalize
    from matplotlib.cm import ScalarMappable

    values = np.asarray(values, dtype=np.float64)
    if log:  # zero -> -inf, drawn as the darkest colour (colorize clips), not as missing
        with np.errstate(divide="ignore", invalid="ignore"):
            values = np.where(values >= 0, np.log10(values), np.nan)
    ok = values[np.isfinite(values)]
    lo, hi = (float(ok.min()), float(ok.max())) if ok.size else (0.0, 1.0)
    if vrange is not None:
        lo, hi = vrange
    rgb = colorize(values, lo, hi)
    fig, ax = plt.subplots(figsize=(10, 1.6 + 0.22 * min(len(layers), 48)))
    ax.imshow(rgb, aspect="auto", interpolation="nearest")
    ax.set_yticks(_ticks(len(layers), 16), [str(layers[i]) for i in _ticks(len(layers), 16)])
    xt = _ticks(len(steps), 10)
    ax.set_xticks(xt, [str(steps[j]) for j in xt])
    ax.set_ylabel("layer")
    ax.set_xlabel(xlabel)
    column = {s: j for j, s in enumerate(steps)}
    marked = [column[s] for s in spike_steps if s in column]
    if marked:
        ax.plot(marked, [-0.5] * len(marked), marker="v", ms=9, color=SPIKE_COLOR, ls="none",
                clip_on=False, label="spike")
    ramp = colorize(np.linspace(0.0, 1.0, 256)[None, :], 0.0, 1.0)[0] / 255.0
    bar = fig.colorbar(ScalarMappable(Normalize(lo, hi), ListedColormap(ramp)), ax=ax, pad=0.01)
    bar.set_label("log10" if log else unit)  # the family is in the title
    if np.isnan(values).any():  # -inf (a zero on the log scale) is not NaN
        ax.set_title(f"{title}  (grey: no value)", fontsize=10)
    else:
        ax.set_title(title, fontsize=10)
    fig.tight_layout()
    _save(fig, path)
    return lo, hi


def _ticks(n: int, most: int) -> list[int]:
    """At most ``most`` evenly spread indices of ``range(n)``, first and last included."""
    if n <= most:
        return list(range(n))
    return sorted({int(round(i)) for i in np.linspace(0, n - 1, most)})

