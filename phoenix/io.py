"""Atomic publication of files: readers see the old file or the whole new one, never half.

Everything phoenix writes that another process may read (plans, configs, checkpoint
pointers, CSVs, eval reports) goes through here: the content is written to a temporary
file in the destination's directory (same filesystem, so the rename is atomic), flushed
and fsynced, then renamed over the destination. On any error the temporary file is removed.

:func:`publish_dir` does the same for a directory of files (e.g. ``.npy`` arrays that
readers memory-map): it is filled under a temporary name and renamed into place whole;
a published directory is never modified, so a reader's memory maps stay valid.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import BinaryIO, Callable, Iterator


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


def publish_dir(path: str | os.PathLike, write: Callable[[Path], None]) -> bool:
    """Publish the directory ``path`` with the files ``write(tmp_dir)`` creates in it.

    The files are fsynced and the directory renamed into place, so readers see no
    directory or the complete one. When another process publishes ``path`` first (two
    jobs building the same deterministic cache entry at once), ours is discarded and
    False is returned; True when this call published it.
    """
    path = Path(path)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    try:
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; other users' jobs read caches too
        write(tmp)
        for f in tmp.iterdir():
            with open(f, "rb+") as handle:
                os.fsync(handle.fileno())
        try:
            os.rename(tmp, path)
        except OSError as e:
            if e.errno in (errno.EEXIST, errno.ENOTEMPTY) and path.is_dir():
                shutil.rmtree(tmp, ignore_errors=True)
                return False
            raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync_dir(path.parent)
    return True


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some filesystems refuse fsync on a directory
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_output_dir(out: str | os.PathLike,
                      exists_error: type[Exception] = FileExistsError) -> Iterator[Path]:
    """A temporary folder next to ``out``, renamed to ``out`` when the block succeeds and
    removed when it fails: a partial output is never left behind. Raises ``exists_error``
    naming ``out`` when it already exists (an output is never overwritten)."""
    out = Path(out)
    if out.exists():
        raise exists_error(f"{out} already exists; choose a new output folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".tmp-{out.name}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
