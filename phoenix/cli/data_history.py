"""Which data plans a run read at every step, across its resumes (``phoenix inspect-batch``).

A resume that changes the data starts new plans at the resume step (an implicit stage
boundary, :mod:`phoenix.data.data_resume`), and the run directory's ``config.yaml`` then
holds only the new config. So the steps of a run fall into *segments*, each read from the
plans of one config rebased at one boundary:

* the checkpoint's data history (``"data"`` state, ``history``): every earlier boundary
  with the config trained before it;
* the latest checkpoint's own config and boundary, up to its step;
* after it, the run directory's ``config.yaml``: when it changes the data against that
  checkpoint (a job resumed from it with a data change and saved nothing since, or is
  still running), the boundary at the checkpoint's step is computed the way the job
  computed it (:func:`phoenix.data.plan_cache.data_change`).

A run without a checkpoint is one segment: ``config.yaml`` from step 0.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import yaml

from phoenix.checkpoint.resume_contract import check_resume
from phoenix.checkpoint.store import checkpoint_root, find_latest, read_checkpoint_state, step_of
from phoenix.config import ConfigError, RunConfig, build_config
from phoenix.config.loader import load_saved_config
from phoenix.data.data_resume import DataResume
from phoenix.data.plan import DataPlan, PlanInputs
from phoenix.data.plan_cache import data_change


@dataclass(frozen=True)
class Segment:
    """Steps ``[.., until)`` (0-based; None: to the end) read the plans of ``config``
    rebased at ``resume`` (None: from step 0)."""

    until: Optional[int]
    config: RunConfig
    resume: Optional[DataResume]
    recut: bool = True
    """False: planned before re-cut streams continued exactly (see DataState)."""


def data_segments(run_dir: str | Path, cfg: RunConfig,
                  get_plan: Optional[Callable[[PlanInputs], DataPlan]] = None) -> list[Segment]:
    """The run's segments in step order; ``cfg``: the run directory's ``config.yaml``;
    ``get_plan``: how the plans a boundary needs are loaded (default: the run's cache).
    Raises ConfigError for a history entry or checkpoint config that does not load."""
    latest = find_latest(checkpoint_root(run_dir))
    if latest is None:
        return [Segment(None, cfg, None)]
    states = read_checkpoint_state(latest).get("states", {})
    # format 2 kept the boundary in the trainer's state (no history then)
    data = states.get("data") or {"data_resume": states.get("trainer", {}).get("data_resume")}
    recut = "stream_recut" in data
    segments = [Segment(int(h["until"]), build_config(yaml.safe_load(h["config"])),
                        DataResume.from_dict(h["data_resume"]), recut)
                for h in data.get("history", [])]
    step = step_of(latest)
    resume = DataResume.from_dict(data.get("data_resume"))
    try:
        changed = check_resume(latest, cfg, step).data_changed
    except ConfigError:   # a config a resume refuses never trained
        changed = []
    if changed:
        saved = load_saved_config(latest / "config.yaml")
        segments.append(Segment(step, saved, resume, recut))
        segments.append(Segment(None, cfg, data_change(saved, resume, step, get_plan, recut), recut))
    else:
        segments.append(Segment(None, cfg, resume, recut))
    return segments


def segment_at(segments: list[Segment], step: int) -> Segment:
    """The segment of 0-based ``step``."""
    return next(s for s in segments if s.until is None or step < s.until)
