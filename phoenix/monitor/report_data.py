"""What a run report reads: a run's TensorBoard scalars, its spike records and its stages.

A run folder (a recipe's ``output_dir``) holds ``tensorboard/<name>/`` (the event files
of every job of the run, :mod:`phoenix.monitor.tensorboard`), ``spikes.jsonl``
(:mod:`phoenix.monitor.spikes`) and ``config.yaml`` (the resolved recipe the trainer
wrote: its stages and ``train.skip_batches``). :func:`load_run` reads the three into a
:class:`RunData`; nothing here draws.

The scalars are read with TensorBoard's own ``EventAccumulator``, keeping every event
(no reservoir sampling), so a resumed run's re-run steps appear once, as TensorBoard
shows them. Steps are the 1-based optimizer steps of ``1_train/loss``.

Stage boundaries come from the run's ``config.yaml`` through the config's stage table
(:meth:`phoenix.config.stage_table.StageTable.boundaries`, the table the trainer ran);
when that file is missing or no longer loads, from where ``1_train/stage`` changes. A
stage that starts at 0-based optimizer step ``s`` begins with logged step ``s + 1``.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from phoenix.monitor.spikes import read_spikes
from phoenix.monitor.tags import DATASETS, TRAIN

EVENT_GLOB = "events.out.tfevents.*"
TOKENS_TAG = f"{TRAIN}/consumed_tokens"
STAGE_TAG = f"{TRAIN}/stage"

LAYER_TAG = re.compile(r"^(?P<family>(?!moe/)[A-Za-z0-9_]+(?:/[A-Za-z0-9_]+)*?)"
                       r"/layer_(?P<layer>\d+)$")
"""A whole layer's value of a per-layer family: ``grad_norm/layer_07``, ``param_norm/...``,
``update_norm``, ``update_ratio``, and any family recorded the same way (optimizer-state
norms such as ``adam_exp_avg_norm/layer_07`` or ``adam/exp_avg/layer_07``). Parts of a
layer (``grad_norm/layer_07/mlp/fc1``) are not whole layers."""
MOE_LAYER_TAG = re.compile(r"^moe/layer_(?P<layer>\d+)/(?P<metric>[A-Za-z0-9_]+)$")
"""A MoE layer's routing metric (:mod:`phoenix.monitor.moe`): family ``moe/<metric>``."""
MOE_EXPERT_TAG = re.compile(r"^moe/layer_(?P<layer>\d+)/expert_(?P<expert>\d+)/tokens$")
"""An expert's share of its layer's routed tokens."""


@dataclass
class Series:
    """One scalar tag: logged steps (ascending) and their values (NaN kept)."""

    steps: list[int]
    values: list[float]


@dataclass
class RunData:
    label: str
    """The run's name on the page (unique among the report's runs)."""
    path: Path
    name: str
    """The recipe's ``name`` (the TensorBoard subfolder)."""
    scalars: dict[str, Series]
    stages: list[dict] = field(default_factory=list)
    """``{"name", "start_step" (0-based optimizer step), "first_step" (its first logged
    step)}`` of every stage when the run has explicit stages, else empty."""
    stage_source: str = ""
    spikes: list[dict] = field(default_factory=list)
    """The records of ``spikes.jsonl`` (last record of a step wins, steps ascending)."""
    skipped: list[int] = field(default_factory=list)
    """Steps ``train.skip_batches`` skipped (1-based, ascending; up to the last logged step
    of ``1_train/loss``): they trained nothing and logged nothing, a gap in every curve."""

    def tokens_at(self, steps) -> list[float] | None:
        """Consumed tokens after each of ``steps`` (linear between the logged steps of
        ``1_train/consumed_tokens``); None when the run did not log it."""
        tokens = self.scalars.get(TOKENS_TAG)
        if tokens is None or not tokens.steps:
            return None
        return np.interp(np.asarray(steps, dtype=np.float64), tokens.steps,
                         tokens.values).tolist()

    def dataset_loss_tags(self) -> list[str]:
        prefix = f"{DATASETS}/loss/"
        return sorted(t for t in self.scalars if t.startswith(prefix))

    def layer_families(self) -> dict[str, dict[int, Series]]:
        """Per-layer families by name (``grad_norm``, ..., ``moe/imbalance``): layer -> series."""
        out: dict[str, dict[int, Series]] = {}
        for tag, series in self.scalars.items():
            m = LAYER_TAG.match(tag)
            if m:
                out.setdefault(m["family"], {})[int(m["layer"])] = series
                continue
            m = MOE_LAYER_TAG.match(tag)
            if m:
                out.setdefault(f"moe/{m['metric']}", {})[int(m["layer"])] = series
        return {k: out[k] for k in sorted(out)}


    def expert_load(self) -> tuple[int, list[int], list[int], np.ndarray] | None:
        """(step, MoE layer ids, expert ids, ``[layers, experts]`` share x E) at the last
        step that logged ``moe/layer_XX/expert_YY/tokens`` (1.0: a balanced expert; NaN
        where a layer has fewer experts); None without those tags."""
        shares: dict[tuple[int, int], Series] = {}
        for tag, series in self.scalars.items():
            m = MOE_EXPERT_TAG.match(tag)
            if m and series.steps:
                shares[int(m["layer"]), int(m["expert"])] = series
        if not shares:
            return None
        step = max(s.steps[-1] for s in shares.values())
        layers = sorted({layer for layer, _ in shares})
        experts = sorted({expert for _, expert in shares})
        values = np.full((len(layers), len(experts)), np.nan)
        for (layer, expert), series in shares.items():
            if series.steps[-1] == step:
                values[layers.index(layer), experts.index(expert)] = series.values[-1]
        width = np.isfinite(values).sum(axis=1, keepdims=True)  # experts of each layer
        return step, layers, experts, values * width


# -- locating a run's files -----------------------------------------------------------
def event_dir(run: Path) -> Path:
    """The run's TensorBoard folder, ``RUN/tensorboard/<name>/``. ``ValueError`` (one
    line) when ``run`` is not a folder or holds no event file."""
    run = Path(run)
    if not run.is_dir():
        raise ValueError(f"{run}: no such run folder")
    root = run / "tensorboard"
    candidates = sorted({p.parent for p in root.glob(f"*/{EVENT_GLOB}")}) if root.is_dir() else []
    if not candidates:
        raise ValueError(f"{run}: no TensorBoard event files under {root}/<name>/ "
                         "(was logging.tensorboard on?)")
    if len(candidates) == 1:
        return candidates[0]
    name = _recipe_name(run)
    if name is not None and root / name in candidates:
        return root / name
    raise ValueError(f"{run}: several TensorBoard runs ({', '.join(p.name for p in candidates)}) "
                     "and no config.yaml naming one")


def _recipe_name(run: Path) -> str | None:
    from phoenix.config.loader import read_yaml

    try:
        name = read_yaml(run / "config.yaml").get("name")
    except Exception:  # a missing or unreadable config: the folder decides alone
        return None
    return name if isinstance(name, str) else None


# -- reading --------------------------------------------------------------------------
def read_scalars(folder: Path) -> dict[str, Series]:
    """Every scalar tag of an event folder, every event kept, read by TensorBoard."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    acc.Reload()
    out = {}
    for tag in sorted(acc.Tags()["scalars"]):
        events = acc.Scalars(tag)
        out[tag] = Series([int(e.step) for e in events], [float(e.value) for e in events])
    return out


def _saved_config(run: Path):
    """The run's ``config.yaml`` (phoenix.config.loader.load_saved_config), or None when
    it is missing or no longer loads (a newer schema)."""
    from phoenix.config.loader import load_saved_config

    config = run / "config.yaml"
    if not config.is_file():
        return None
    try:
        return load_saved_config(config)
    except Exception:  # the report falls back to the event files
        return None


def read_stages(config, scalars: dict[str, Series]) -> tuple[list[dict], str]:
    """(stages, where they came from): the run's config (:func:`_saved_config`), else
    ``1_train/stage``."""
    try:
        table = config.resolved.stages if config is not None else None
    except Exception:  # moved datasets: the stage table needs them; the event files decide
        table = None
    if table is not None:
        if not table.explicit:
            return [], "config.yaml"
        return [{"name": name, "start_step": start, "first_step": start + 1}
                for name, start in table.boundaries()], "config.yaml"
    series = scalars.get(STAGE_TAG)
    if series is None:
        return [], ""
    stages, previous = [], None
    for step, value in zip(series.steps, series.values):
        if value != previous:
            # The first logged step of a stage; the stage's name is not in the scalars.
            stages.append({"name": f"stage {int(value)}", "start_step": step - 1,
                           "first_step": step})
            previous = value
    return stages, STAGE_TAG


def read_spike_records(run: Path) -> list[dict]:
    """``spikes.jsonl``'s records, one per step (a re-run step's last record), ascending."""
    by_step = {}
    for record in read_spikes(run / "spikes.jsonl"):
        if isinstance(record.get("step"), int):
            by_step[record["step"]] = record
    return [by_step[s] for s in sorted(by_step)]


def read_skipped(config, scalars: dict[str, Series]) -> list[int]:
    """The steps the run skipped by ``train.skip_batches`` (the config's ranges: a resume
    refuses to change past ones), up to its last logged step."""
    from phoenix.config.skip import skipped_steps

    loss = scalars.get(f"{TRAIN}/loss")
    if config is None or loss is None or not loss.steps:
        return []
    return sorted(skipped_steps(config.train.skip_batches, upto=max(loss.steps)))


def load_run(run: str | Path, label: str | None = None) -> RunData:
    run = Path(run)
    folder = event_dir(run)
    scalars = read_scalars(folder)
    config = _saved_config(run)
    stages, source = read_stages(config, scalars)
    return RunData(label or folder.name, run, folder.name, scalars, stages, source,
                   read_spike_records(run), read_skipped(config, scalars))


def load_runs(runs: list[str | Path]) -> list[RunData]:
    """Every run, labelled by its recipe name; runs of the same name by their folder too
    (its path when the folder has the recipe's name)."""
    loaded = [load_run(r) for r in runs]
    names = [r.name for r in loaded]
    for r in loaded:
        if names.count(r.name) > 1:  # the folder tells them apart (its path, if named alike)
            where = r.path.name if r.path.name not in ("", r.name) else str(r.path)
            r.label = f"{r.name} ({where})"
    labels = [r.label for r in loaded]
    for i, r in enumerate(loaded):
        if labels.count(r.label) > 1:
            r.label = f"{r.label} #{i + 1}"
    return loaded


def finite(x: float) -> float | None:
    """JSON's view of a float (NaN and infinities are ``null``)."""
    return x if x is None or math.isfinite(x) else None


def layer_matrix(layers: dict[int, Series], max_columns: int = 1024, skipped=()
                 ) -> tuple[list[int], list[int], np.ndarray]:
    """(layer ids, column steps, ``float64 [layers, columns]``) of a per-layer family, NaN
    where a layer has no value at a step. ``skipped``: steps the run skipped
    (``train.skip_batches``), which log nothing: each one the family's logging interval
    would have logged gets an empty column, so the step before and after it do not look
    adjacent. Past ``max_columns`` columns, consecutive steps are averaged in equal bins (a
    column is named by its bin's last step), so a long run stays one readable image."""
    ids = sorted(layers)
    steps = sorted(set().union(*(s.steps for s in layers.values()))) if ids else []
    if len(steps) > 1 and skipped:
        every = min(b - a for a, b in zip(steps, steps[1:]))
        steps = sorted(set(steps) | {s for s in skipped if steps[0] < s < steps[-1]
                                     and (s - steps[0]) % every == 0})
    column = {s: j for j, s in enumerate(steps)}
    values = np.full((len(ids), len(steps)), np.nan)
    for i, layer in enumerate(ids):
        for s, v in zip(layers[layer].steps, layers[layer].values):
            values[i, column[s]] = v
    if len(steps) <= max_columns:
        return ids, steps, values
    edges = np.linspace(0, len(steps), max_columns + 1).astype(int)
    binned = np.full((len(ids), max_columns), np.nan)
    for j in range(max_columns):
        block = values[:, edges[j]:edges[j + 1]]
        counts = np.isfinite(block).sum(axis=1)
        sums = np.where(np.isfinite(block), block, 0.0).sum(axis=1)
        binned[:, j] = np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)
    return ids, [steps[e - 1] for e in edges[1:]], binned
