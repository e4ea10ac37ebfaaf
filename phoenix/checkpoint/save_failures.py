"""A save that does not fit or fails: the free-space check before it, the one line after it,
and the sweep of the temporary directories that dead writers left.

A save is written to ``checkpoints/.tmp-step_NNNNNN`` and renamed into place when complete
(phoenix.checkpoint.store). When a write fails on any rank (a full disk, a quota, an I/O
error), every rank learns it at the same point (phoenix.checkpoint.sharded_save), rank 0
removes the temporary directory, and :class:`CheckpointSaveError` says in one line what
failed, where, the free and needed bytes, and which checkpoint is intact. A job killed
during a save leaves its temporary directory behind; the next job on the run directory
removes it at start-up, before writing anything, when no live job holds the run directory
(:func:`sweep_unfinished_saves`), so a full disk does not stay full.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

TMP_PREFIX = ".tmp-"
NEARLY_FULL = 1 << 20
"""Bytes: a file system with less free space than this after a failed write was full
(torch.save reports a full disk as ``unexpected pos``, without an errno)."""


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"


def dir_bytes(path: Path) -> int:
    """Bytes of the files under ``path``."""
    total = 0
    for dirpath, _, files in os.walk(path):
        for f in files:
            try:
                total += os.lstat(os.path.join(dirpath, f)).st_size
            except OSError:
                pass
    return total


def free_bytes(path: Path) -> int:
    """Free bytes (for this user) on the file system of ``path`` or its nearest existing
    parent."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free


@dataclass(frozen=True)
class SaveSpace:
    """Free space before a save against what it needs (rank 0's view)."""

    where: Path
    free: int
    needed: int
    basis: str
    """How ``needed`` was found: this save's tensor bytes, or the previous checkpoint's size
    when that is larger."""

    @classmethod
    def measure(cls, root: Path, state_bytes: int, previous: Optional[Path]) -> "SaveSpace":
        needed, basis = state_bytes, "the size of its shards"
        if previous is not None:
            size = dir_bytes(previous)
            if size > needed:
                needed, basis = size, f"the size of {previous.name}"
        return cls(Path(root), free_bytes(root), needed, basis)

    @property
    def fits(self) -> bool:
        return self.free >= self.needed

    def describe(self) -> str:
        return (f"{self.where} has {human_bytes(self.free)} free, the save needs about "
                f"{human_bytes(self.needed)} ({self.basis})")


class CheckpointSaveError(RuntimeError):
    """A checkpoint could not be written; its temporary directory was removed and the
    previous checkpoint is intact. The message is one line: what, where, free vs needed
    bytes, and the checkpoint a restart resumes from."""

    def __init__(self, step: int, root: Path, reason: str, no_space: bool,
                 space: Optional[SaveSpace], previous: Optional[Path]):
        self.step, self.root, self.previous = step, Path(root), previous
        self.no_space = no_space or (space is not None and not space.fits)
        what = "no space left on device" if self.no_space else reason
        numbers = (f" ({human_bytes(space.free)} free before the save, about "
                   f"{human_bytes(space.needed)} needed)" if space is not None else "")
        kept = (f"the previous checkpoint {previous.name} is intact" if previous is not None
                else "the run has no earlier checkpoint")
        super().__init__(f"checkpoint step_{step:06d} was not saved: {what} in {self.root}"
                         f"{numbers}; its temporary directory was removed and {kept}")


def nearly_full(path: Path) -> bool:
    """Less than :data:`NEARLY_FULL` bytes are free where ``path`` lives."""
    try:
        return free_bytes(path) < NEARLY_FULL
    except OSError:
        return False


def sweep_unfinished_saves(output_dir: str | os.PathLike) -> list[tuple[str, int]]:
    """Remove the temporary directories of saves that never finished in the run directory
    ``output_dir`` when no live job holds it (its run lock); returns (name, bytes) of each.

    Called before the lock is taken: a dead job's unfinished save may have filled the disk,
    and then not even the lock file could be written. A live holder may be saving, so
    nothing is removed while there is one."""
    from phoenix.runtime.run_lock import live_holder

    root = Path(output_dir) / "checkpoints"
    removed = []
    if not root.is_dir() or live_holder(output_dir) is not None:
        return removed
    for d in sorted(root.glob(f"{TMP_PREFIX}*")):
        if d.is_dir():
            size = dir_bytes(d)
            shutil.rmtree(d, ignore_errors=True)
            removed.append((d.name, size))
    return removed
