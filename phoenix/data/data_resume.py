"""A data change on resume as an implicit stage boundary.

When a resumed run changes the data of the stage in progress (its mixture, batch size or
sequence length; see phoenix.checkpoint.resume_contract), the run continues at step
``r`` under the new config's stages, clipped to start at ``r``, and every dataset's
stream continues exactly where the interrupted run's plans had consumed it by step
``r`` -- what ``stages:`` does at a planned boundary. A :class:`DataResume` records that
point (the step, the samples consumed before it, each dataset's stream position); it is
kept in the checkpoint under the data layer's own key (:class:`DataState`, ``"data"``), so
later resumes rebuild the same plans.

Exactness: for an ungrouped dataset the plan consumes its stream in order, so the stream
position after batch ``k`` of a stage is the stage's start offset plus the dataset's
counts of batches ``0..k-1``. A whole-group dataset's packing looks ahead, so only a stage
boundary gives a single position; a mid-stage change while such a dataset is read is
refused (ValueError naming the dataset).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

import numpy as np

from phoenix.config.stage_table import ResolvedStage, StageTable
from phoenix.data.stream_recut import StreamHead


@dataclass(frozen=True)
class DataResume:
    """Where the data stood at step ``step`` of a run whose data plan changed there."""

    step: int
    start_sample: int
    """Samples consumed by steps ``[0, step)``."""
    streams: dict[str, tuple]
    """Dataset name -> (seq_length, grouped, stream position, samples per epoch, origin,
    seed, reseeded): ``origin`` is None, or, while the stream reads the remainder of an
    epoch re-cut in mid-epoch, the old cut's ``(seq_length, grouped, position, samples[,
    seed])`` at the re-cut (the remainder is rebuilt from it,
    :mod:`phoenix.data.stream_recut`); ``seed``: of the stream's order (a stage's
    ``data_seed``; None: ``train.seed``); ``reseeded``: None, or, while the stream reads
    the remainder of an epoch reseeded in mid-epoch, its ``StreamHead``."""

    def to_dict(self) -> dict:
        def entry(v):
            out = [*v[:4], None if v[4] is None else list(v[4])]
            if len(v) > 5 and (v[5] is not None or v[6] is not None):  # a data_seed run
                head = v[6]
                out += [v[5], None if head is None else [head.epoch, head.count, head.from_seed]]
            return out
        return {"step": self.step, "start_sample": self.start_sample,
                "streams": {k: entry(v) for k, v in self.streams.items()}}

    @classmethod
    def from_dict(cls, d: Optional[dict]) -> Optional["DataResume"]:
        if not d:
            return None
        return cls(step=int(d["step"]), start_sample=int(d["start_sample"]),
                   streams={k: _stream(v) for k, v in d["streams"].items()})


def _stream(v: list) -> tuple:
    """A stored stream entry (4 fields before re-cuts were continued: no origin; 5 before
    data_seed: no seed, no reseeded head)."""
    a, b, c, n = v[:4]
    origin = v[4] if len(v) > 4 else None
    if origin is not None:
        origin = (int(origin[0]), bool(origin[1]), int(origin[2]), int(origin[3]),
                  *[int(x) for x in origin[4:]])
    seed = None if len(v) < 6 or v[5] is None else int(v[5])
    head = None if len(v) < 7 or v[6] is None else StreamHead(*(int(x) for x in v[6]))
    return int(a), bool(b), int(c), int(n), origin, seed, head


def rebase(table: StageTable, resume: Optional[DataResume]) -> StageTable:
    """``table`` from ``resume.step`` on: earlier stages dropped, the stage containing the
    step clipped to start there (after ``resume.start_sample`` samples). Raises ValueError
    when the step falls inside that stage's mixture warmup."""
    if resume is None:
        return table
    r, sample, stages = resume.step, resume.start_sample, []
    for s in table.stages:
        if s.end_step <= r:
            continue
        if s.start_step < r:
            into = r - s.start_step
            if into < s.warmup_steps:
                raise ValueError(f"stage '{s.name}': the data change at step {r} falls inside its "
                                 f"mixture warmup (steps {s.start_step}..{s.start_step + s.warmup_steps - 1})")
            s = dataclasses.replace(s, start_step=r, warmup_steps=0, warmup_from=None, tokens=None)
        stages.append(dataclasses.replace(s, index=len(stages), start_sample=sample))
        sample += s.steps * s.global_batch_size
    return StageTable(stages, table.dataset_names, table.explicit)


def streams_at(plans: list, step: int, start: Optional[DataResume] = None,
               ) -> dict[str, tuple]:
    """Every dataset's stream position after ``step`` steps of a run whose (rebased) stage
    plans are ``plans`` (``(StagePlanInputs, DataPlan)`` pairs in order) and whose earlier
    boundary is ``start``. Raises ValueError for a grouped dataset mid-stage."""
    streams = dict(start.streams) if start is not None else {}
    for spi, plan in plans:
        stage: ResolvedStage = spi.stage
        if stage.start_step >= step:
            break
        inside = step - stage.start_step
        for d, key in enumerate(spi.keys):
            if key is None:
                continue
            name = spi.inputs.datasets[d].name
            n = int(spi.inputs.datasets[d].num_samples)
            origin = spi.origins[d] if spi.origins else None
            head = spi.inputs.heads[d] if spi.inputs.heads else None
            reseeded = head if head is not None and head.from_seed is not None else None
            if inside >= stage.steps:
                end = int(plan.end_offsets[d])
                streams[name] = (key[0], key[1], end, n, _inside(origin, end, n),
                                 stage.data_seed, _reseeded(reseeded, end, n))
                continue
            if key[1] and plan.counts[:inside, d].any():
                raise ValueError(f"dataset '{name}' is read whole-group in stage '{stage.name}'; its "
                                 f"stream has no single position at step {step} (mid-stage): "
                                 f"change the data at a stage boundary")
            offset = int(spi.inputs.start_offsets[d]) + int(np.sum(plan.counts[:inside, d], dtype=np.int64))
            streams[name] = (key[0], key[1], offset, n, _inside(origin, offset, n),
                             stage.data_seed, _reseeded(reseeded, offset, n))
    return streams


def _reseeded(head: Optional[StreamHead], offset: int, n: int) -> Optional[StreamHead]:
    """``head`` (a reseeded remainder) while ``offset`` is still in its epoch, else None."""
    return head if head is not None and offset < (head.epoch + 1) * n else None


def _inside(origin: Optional[tuple], offset: int, n: int) -> Optional[tuple]:
    """``origin`` while ``offset`` (of a stream of ``n`` samples per epoch) is still in
    the epoch it re-cut, else None."""
    return origin if origin is not None and offset < (origin[2] // origin[3] + 1) * n else None


class DataState:
    """The data layer's resumable state in a checkpoint (key ``"data"``): the latest
    implicit stage boundary of the run (:class:`DataResume`, None when there was none)
    and its data history, one entry per earlier boundary, oldest first: ``{"until": the
    boundary's step, "config": the YAML of the config trained before it, "data_resume":
    that config's own boundary (a dict) or None}``. With the checkpoint's config they say
    which plans every step of the run read (``phoenix inspect-batch`` replays them).
    ``stream_recut: 1`` marks a run planned with exact re-cut continuations
    (:mod:`phoenix.data.stream_recut`); a checkpoint without it resumes with the plans it
    began with (``recut=False`` everywhere), so a running job's data never changes.

    Read before any model is built (the plans depend on it), so the checkpointer hands
    the saved value to ``build_source`` from its restore plan; ``load_state_dict`` only
    checks that what the source was built with is what the checkpoint holds."""

    def __init__(self, resume: Optional[DataResume] = None, history: Optional[list] = None,
                 recut: bool = True):
        self.resume = resume
        self.history = list(history or [])
        self.recut = recut

    def state_dict(self) -> dict:
        state = {"data_resume": self.resume.to_dict() if self.resume else None,
                 "history": self.history}
        if self.recut:  # absent: a run begun before re-cut streams continued exactly
            state["stream_recut"] = 1
        return state

    def load_state_dict(self, state: dict) -> None:
        saved = DataResume.from_dict(state.get("data_resume"))
        if saved is not None and self.resume is None:
            raise ValueError("DataState: the checkpoint has a data boundary the source was not "
                             "built with")


def extend_history(saved: Optional[dict], step: int, old_config_yaml: str) -> list:
    """The data history after a resume at ``step`` that changed the data: the checkpoint's
    (``saved``: its ``"data"`` state) plus the boundary at ``step``, before which the run
    trained with ``old_config_yaml`` and the checkpoint's own boundary."""
    saved = saved or {}
    return [*saved.get("history", []), {"until": int(step), "config": old_config_yaml,
                                        "data_resume": saved.get("data_resume")}]
