"""Atomic publication of files: readers see the old file or the whole new one, never half.

Everything phoenix writes that another process may read (plans, configs, checkpoint
pointers, CSVs, eval reports) goes through here: the content is written to a temporary
file in the destination's directory (same filesystem, so the rename is atomic), flushed
and fsynced, then renamed over the destination. On any error the temporary file is removed.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import BinaryIO, Callable


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], None]) -> None:
    """Publish ``path`` with the bytes ``write(f)`` puts into a binary file object."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write(path, lambda f: f.write(text.encode("utf-8")))
