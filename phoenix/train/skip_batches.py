"""``train.skip_batches``: steps whose global batch is drawn from the data plan but not trained.

A skipped step (1-based, as the logs show it) consumes its global batch's place in the
data plan, so every later step reads exactly the samples it would have read without the
skip, but it runs no forward, no backward and no optimizer update; its tokens are not
even read from disk (the loader hands out None), so a batch skipped for corrupt data
cannot stop the run. As Megatron-LM's ``--skip-train-iteration-range``, the step
counter and ``consumed_samples`` advance over it. Unlike Megatron-LM, whose LR scheduler
is not stepped on a skipped iteration (so its LR then lags the iteration count), the LR
schedule advances too: in phoenix the LR is a function of the step (``phoenix lr-plot``
of the run's config is what every step used, and stages' LR phases stay aligned with
their data), as for an update skipped by ``request_skip`` (a loss spike). Adam's step
count does not advance; ``consumed_tokens`` (loss-bearing tokens trained on) does not
either. No callback runs on a skipped step (no loss, no metrics line, no eval); a
checkpoint due at it is saved as usual. Every rank reads the same config, so all ranks
skip the same steps without communication (PP and DP stay in step).

Provenance: the logging rank appends one JSON line per skipped step to
``<output_dir>/skipped_batches.jsonl`` (flushed at once), with the fields a
``spikes.jsonl`` record uses for its batch (phoenix.monitor.spikes)::

    {"step": 3, "stage": "main", "global_batch_size": 8,
     "dataset_counts": {"web": 6, "code": 2},
     "samples": [{"dataset": "web", "dataset_id": 0, "sample_id": 4711,
                  "group_id": -1, "document_id": 3120}, ...],
     "time": 1718000000.0}

``samples`` lists the whole global batch in plan order, from the data source's
provenance (the plan and the sample index; no token is read). A step already in the file
(a job that skipped it and was interrupted before its next checkpoint) is not written
again, so the file holds each skipped step once. The console gets one line per range.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from phoenix.config.skip import merged_ranges, skipped_steps
from phoenix.io import read_jsonl

log = logging.getLogger("phoenix.train")

FILENAME = "skipped_batches.jsonl"


def read_skipped(path: str | Path) -> list[dict]:
    """The records of a ``skipped_batches.jsonl`` (an unfinished last line is ignored)."""
    return read_jsonl(path)


class BatchSkipper:
    """The run's skipped steps, and their record. ``ranges``: ``train.skip_batches``;
    ``names``: dataset names by ``dataset_id``; ``logging``: whether this rank writes."""

    def __init__(self, ranges: list, output_dir: str | Path, names: list[str], logging: bool):
        self.steps = skipped_steps(ranges)
        self.ranges = merged_ranges(self.steps)
        self.path = Path(output_dir) / FILENAME
        self.names, self.logging = list(names), logging
        self._written: set[int] = set()
        self._announced: set[int] = set()

    def loader_steps(self) -> frozenset[int]:
        """The skipped steps as the loader counts them (0-based)."""
        return frozenset(s - 1 for s in self.steps)

    def skips(self, step: int) -> bool:
        """Whether 1-based ``step`` is skipped."""
        return step in self.steps

    def start(self) -> None:
        """Read which steps an earlier job already recorded (logging rank)."""
        if self.logging and self.steps:
            self._written = {r["step"] for r in read_skipped(self.path) if isinstance(r.get("step"), int)}
            if self.path.is_file() and not self.path.read_bytes().endswith(b"\n"):
                with open(self.path, "a") as f:  # a line a killed job left unfinished
                    f.write("\n")

    def skip(self, step: int, stage, source, batch_start: int) -> None:
        """Record skipped 1-based ``step`` of ``stage``, whose global batch starts at
        position ``batch_start`` of ``source``; says so once per range."""
        if not self.logging:
            return
        start, end = next(r for r in self.ranges if r[0] <= step <= r[1])
        if start not in self._announced:
            self._announced.add(start)
            log.info("skipping steps %d..%d (train.skip_batches; from step %d in this job): their "
                     "global batches are drawn, not trained; provenance -> %s",
                     start, end, step, self.path)
        if step in self._written:
            return
        rows = [source.provenance(batch_start + j) for j in range(stage.global_batch_size)]
        counts: dict[str, int] = {}
        samples = []
        for r in rows:
            name = self.names[r["dataset_id"]] if 0 <= r["dataset_id"] < len(self.names) else str(r["dataset_id"])
            counts[name] = counts.get(name, 0) + 1
            samples.append({"dataset": name, **r})
        record = {"step": step, "stage": stage.name, "global_batch_size": stage.global_batch_size,
                  "dataset_counts": counts, "samples": samples, "time": time.time()}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as f:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
        self._written.add(step)
