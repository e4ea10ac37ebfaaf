"""``train.skip_batches``: the step ranges whose global batches are drawn but not trained.

Pure checks and lookups on the ranges, used where the config is resolved (against the
run's length), by the trainer (phoenix.train.skip_batches) and by the resume contract
(phoenix.checkpoint.resume_contract: ranges at or before the resume step are history).
"""

from __future__ import annotations

from phoenix.config.typed import ConfigError


def check_skip_batches(ranges: list, total_steps: int) -> None:
    """Raise ConfigError (one line naming ``train.skip_batches[i]``) unless every range is
    ``[start, end]`` with ``1 <= start <= end <= total_steps`` (1-based optimizer steps)."""
    for i, r in enumerate(ranges):
        key = f"train.skip_batches[{i}]"
        if len(r) != 2 or not all(isinstance(x, int) and not isinstance(x, bool) for x in r):
            raise ConfigError(f"{key}: expected [start, end] (two 1-based steps), got {r!r}")
        start, end = r
        if start < 1:
            raise ConfigError(f"{key}: {r!r} starts before step 1 (steps are 1-based, as the "
                              f"logs show them)")
        if start > end:
            raise ConfigError(f"{key}: {r!r} has start > end (both ends are inclusive)")
        if end > total_steps:
            raise ConfigError(f"{key}: {r!r} ends after the run's last step {total_steps}")


def skipped_steps(ranges: list, upto: int | None = None) -> frozenset[int]:
    """The 1-based steps the ranges cover (only those ``<= upto`` when given)."""
    out = set()
    for start, end in ranges:
        out.update(range(start, (end if upto is None else min(end, upto)) + 1))
    return frozenset(out)


def merged_ranges(steps) -> list[tuple[int, int]]:
    """Sorted 1-based ``steps`` as inclusive ``(start, end)`` runs (overlaps merged)."""
    runs: list[list[int]] = []
    for s in sorted(steps):
        if runs and s == runs[-1][1] + 1:
            runs[-1][1] = s
        else:
            runs.append([s, s])
    return [(a, b) for a, b in runs]
