"""The run report: one HTML page, its PNG figures and ``report.json``, from run folders.

:func:`build_report` reads each run (:mod:`phoenix.monitor.report_data`), draws
(:mod:`phoenix.monitor.report_plots`) and writes into ``out``:

``index.html``
    the page: the runs, then each figure, the spike table (each spike's top samples with
    their dataset / sample / document provenance, and its top layers by grad norm), no
    script, no server; the figures are the PNG files next to it.
``*.png``
    ``loss.png`` (``1_train/loss``, spikes marked, steps ``train.skip_batches`` skipped
    shaded grey), ``dataset_loss.png``
    (``2_datasets/loss/*``), ``lr.png`` (``1_train/lr`` with stage boundaries),
    ``grad_norm.png`` (``1_train/grad_norm``), ``moe_<metric>.png`` (``moe/<metric>``),
    each against the step and against ``1_train/consumed_tokens``, every run on the same
    axes; ``run<i>_<family>.png``: a layer x step heatmap of every per-layer family of run
    ``i`` (``grad_norm``, ``param_norm``, ``update_norm``, ``update_ratio``, any other
    ``<family>/layer_XX`` such as optimizer-state norms; ``moe/<metric>`` of
    ``moe/layer_XX/<metric>``); ``run<i>_moe_expert_load.png``: MoE layer x expert, each
    expert's share of its layer's tokens x the number of experts at the last step that
    logged ``moe/layer_XX/expert_YY/tokens``.
``report.json``
    what every figure shows: ``{"runs": [...], "plots": [...]}``. A line plot lists its
    curves (``run``, ``tag``, ``steps``, ``tokens``, ``values``), stage lines, spike
    marks and skipped steps; a heatmap its ``layers``, ``steps`` and ``values`` (as logged, before the
    log10 of the colour scale). NaN is ``null``.

A figure whose tags no run logged is left out (a dense run has no MoE figure).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from phoenix.io import atomic_write_text
from phoenix.monitor import report_plots as plots
from phoenix.monitor.report_html import page
from phoenix.monitor.report_data import TOKENS_TAG, RunData, finite, layer_matrix, load_runs
from phoenix.monitor.tags import DATASETS, TRAIN

COLORS = ["tab:blue", "tab:orange", "tab:green", "tab:purple", "tab:brown", "tab:pink",
          "tab:olive", "tab:cyan", "tab:gray", "tab:red"]
STYLES = ["-", "--", ":", "-."]


def _clean(values) -> list:
    return [finite(float(v)) for v in values]


def _curve(run: RunData, tag: str, label: str, color: str, linestyle: str = "-") -> dict | None:
    series = run.scalars.get(tag)
    if series is None:
        return None
    return {"run": run.label, "tag": tag, "label": label, "color": color,
            "linestyle": linestyle, "steps": list(series.steps),
            "tokens": run.tokens_at(series.steps) if series.steps else None,
            "values": _clean(series.values)}


def _stage_lines(runs: list[RunData]) -> list[dict]:
    out = []
    for run in runs:
        for s in run.stages:
            if s["start_step"] == 0:
                continue  # the first stage begins where the axis does
            # Between the previous stage's last logged step and this stage's first.
            x = s["first_step"] - 0.5
            tokens = run.tokens_at([x])
            out.append({"run": run.label, "name": s["name"] if len(runs) == 1
                        else f"{run.label}: {s['name']}", "step": x,
                        "tokens": tokens[0] if tokens else None,
                        "color": plots.STAGE_COLOR})
    return out


def _spike_marks(runs: list[RunData], metric: str) -> list[dict]:
    out = []
    for run in runs:
        for r in run.spikes:
            if metric not in (r.get("spikes") or {}) or r.get(metric) is None:
                continue
            tokens = run.tokens_at([r["step"]])
            out.append({"run": run.label, "step": r["step"], "value": r[metric],
                        "tokens": tokens[0] if tokens else None,
                        "text": f"step {r['step']}" if len(runs) == 1
                        else f"{run.label}: step {r['step']}"})
    return out


def _skipped(runs: list[RunData]) -> list[dict]:
    """A band per step ``train.skip_batches`` skipped, at its tokens too: those of the last
    logged step before it (it consumed none)."""
    out = []
    for run in runs:
        tokens = run.scalars.get(TOKENS_TAG)
        for step in run.skipped:
            i = int(np.searchsorted(tokens.steps, step)) - 1 if tokens else -1
            out.append({"run": run.label, "step": step,
                        "tokens": tokens.values[i] if i >= 0 else None})
    return out


def _line_plot(out: Path, png: str, title: str, ylabel: str, curves: list, stages=(),
               marks=(), log_y: bool = False, outliers: set = frozenset(),
               skipped=()) -> dict | None:
    curves = [c for c in curves if c is not None]
    if not curves:
        return None
    plots.lines(out / png, title, ylabel, curves, stages, marks, log_y, outliers, skipped)
    return {"png": png, "kind": "lines", "title": title, "ylabel": ylabel,
            "curves": [{k: c[k] for k in ("run", "tag", "label", "steps", "tokens", "values")}
                       for c in curves],
            "stages": [dict(s) for s in stages], "marks": [dict(m) for m in marks],
            "skipped": [dict(k) for k in skipped]}


def line_plots(runs: list[RunData], out: Path) -> list[dict]:
    color = {run.label: COLORS[i % len(COLORS)] for i, run in enumerate(runs)}
    stages = _stage_lines(runs)
    loss_spikes = _spike_marks(runs, "loss")
    outliers = {(m["run"], m["step"]) for m in loss_spikes}
    found = [
        _line_plot(out, "loss.png", "Training loss", "loss",
                   [_curve(r, f"{TRAIN}/loss", r.label, color[r.label]) for r in runs],
                   stages, loss_spikes, outliers=outliers, skipped=_skipped(runs)),
        _dataset_plot(runs, out, stages, outliers),
        _line_plot(out, "lr.png", "Learning rate (solid lines: stage boundaries)", "LR",
                   [_curve(r, f"{TRAIN}/lr", r.label, color[r.label]) for r in runs], stages),
        _line_plot(out, "grad_norm.png", "Global grad norm (before clipping)", "grad norm",
                   [_curve(r, f"{TRAIN}/grad_norm", r.label, color[r.label]) for r in runs],
                   stages, _spike_marks(runs, "grad_norm"), log_y=True),
    ]
    moe = sorted({t for r in runs for t in r.scalars if t.startswith("moe/") and t.count("/") == 1})
    for tag in moe:
        found.append(_line_plot(out, f"moe_{tag.split('/', 1)[1]}.png", f"MoE: {tag}", tag,
                                [_curve(r, tag, r.label, color[r.label]) for r in runs], stages))
    return [p for p in found if p is not None]


def _dataset_plot(runs: list[RunData], out: Path, stages: list[dict], outliers: set
                  ) -> dict | None:
    """Colour by dataset, line style by run."""
    names = sorted({t.rsplit("/", 1)[1] for r in runs for t in r.dataset_loss_tags()})
    curves = []
    for i, run in enumerate(runs):
        for j, name in enumerate(names):
            label = name if len(runs) == 1 else f"{name} ({run.label})"
            curves.append(_curve(run, f"{DATASETS}/loss/{name}", label, COLORS[j % len(COLORS)],
                                 STYLES[i % len(STYLES)]))
    return _line_plot(out, "dataset_loss.png", "Loss per dataset", "loss", curves, stages,
                      outliers=outliers)


def _log_scale(family: str, values) -> bool:
    """Per-layer norms and ratios (any family but MoE's) are drawn on a log10 colour scale:
    layers differ by orders of magnitude (a zero, e.g. the update of a frozen layer, is
    the darkest colour). MoE metrics (loads, losses, entropy), and a family with a
    negative value, linearly."""
    if family.startswith("moe/"):
        return False
    present = values[np.isfinite(values)]
    return bool((present > 0).any()) and bool((present >= 0).all())


def _shared_scales(matrices_by_run: list[dict]
                   ) -> dict[str, tuple[bool, tuple[float, float] | None]]:
    """Per family: whether it is drawn on a log10 scale, and one colour range (in the
    plotted unit) over every run that has it, so that runs side by side compare by colour
    (a spike in one run is not the same colour as an ordinary step of another).
    ``matrices_by_run``: per run, family -> its :func:`layer_matrix`."""
    by_family: dict[str, list[np.ndarray]] = {}
    for matrices in matrices_by_run:
        for family, (_, _, values) in matrices.items():
            by_family.setdefault(family, []).append(values)
    scales = {}
    for family, matrices in by_family.items():
        log = all(_log_scale(family, m) for m in matrices)
        plotted = []
        for m in matrices:
            m = np.asarray(m, dtype=np.float64)
            if log:
                with np.errstate(divide="ignore", invalid="ignore"):
                    m = np.where(m > 0, np.log10(m), np.nan)  # zeros: darkest, not the range
            plotted.append(m[np.isfinite(m)])
        both = np.concatenate(plotted) if plotted else np.empty(0)
        scales[family] = (log, (float(both.min()), float(both.max())) if both.size else None)
    return scales


def heatmaps(runs: list[RunData], out: Path) -> list[dict]:
    found = []
    matrices_by_run = [{family: layer_matrix(layers, skipped=run.skipped)
                        for family, layers in run.layer_families().items()} for run in runs]
    scales = _shared_scales(matrices_by_run)
    for i, (run, matrices) in enumerate(zip(runs, matrices_by_run)):
        spike_steps = [r["step"] for r in run.spikes]
        for family, (ids, steps, values) in matrices.items():
            log, vrange = scales[family]
            png = f"run{i}_{family.replace('/', '_')}.png"
            title = f"{run.label}: {family} per layer"
            lo, hi = plots.layer_heatmap(out / png, title, ids, steps, values, log, spike_steps,
                                         unit=family.rsplit("/", 1)[-1], vrange=vrange)
            found.append({"png": png, "kind": "heatmap", "title": title, "run": run.label,
                          "family": family,
                          "scale": "log10" if log else "linear", "range": [lo, hi],
                          "layers": ids, "steps": steps,
                          "values": [_clean(row) for row in values]})
        load = run.expert_load()
        if load is not None:
            step, ids, experts, values = load
            png = f"run{i}_moe_expert_load.png"
            title = f"{run.label}: expert load at step {step} (share x experts; 1 = balanced)"
            lo, hi = plots.layer_heatmap(out / png, title, ids, experts, values, False,
                                         xlabel="expert", unit="share x experts")
            found.append({"png": png, "kind": "heatmap", "title": title, "run": run.label,
                          "family": "moe/expert_load", "scale": "linear", "range": [lo, hi],
                          "step": step, "layers": ids, "experts": experts,
                          "values": [_clean(row) for row in values]})
    return found


def build_report(runs: list[str | Path], out: str | Path) -> dict:
    """Read ``runs``, write ``out``/index.html, the PNGs and report.json; returns the JSON
    data. ``ValueError`` (one line) for a run without event files."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    loaded = load_runs(runs)
    report = {"runs": [{"label": r.label, "path": str(r.path), "name": r.name,
                        "stages": r.stages, "stage_source": r.stage_source,
                        "spikes": r.spikes, "skipped": r.skipped} for r in loaded],
              "plots": line_plots(loaded, out) + heatmaps(loaded, out)}
    atomic_write_text(out / "report.json", json.dumps(report, indent=1, allow_nan=False) + "\n")
    atomic_write_text(out / "index.html", page(report))
    return report

