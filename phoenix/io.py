"""Atomic publication of files: readers see the old file or the whole new one, never half.

Everything phoenix writes that another process may read (plans, configs, checkpoint
pointers, CSVs, eval reports) goes through here, with the user's umask (a team sharing
a file system reads each other's runs): the content is written to a temporary
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
import re
import shutil
import socket
import time
import uuid
from pathlib import Path
from typing import BinaryIO, Callable, Iterator


def _create_temp(parent: Path, prefix: str, suffix: str) -> tuple[int, str]:
    """A new file ``parent/PREFIX<random>SUFFIX`` opened for writing, with the permissions
    of any file the user creates (0666 less the umask). ``tempfile.mkstemp`` makes 0600
    files, which then become run files that nobody else on a shared file system can read."""
    for _ in range(100):
        tmp = str(parent / f"{prefix}{uuid.uuid4().hex[:12]}{suffix}")
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"no free temporary name in {parent}")


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], None]) -> None:
    """Publish ``path`` with the bytes ``write(f)`` puts into a binary file object. The
    file has the permissions of any file the user creates (0666 less the umask)."""
    path = Path(path)
    fd, tmp = _create_temp(path.parent, f".{path.name}.", ".tmp")
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
    sweep_stale_dirs(path.parent)
    # host and pid in the name: a build killed mid-way is recognised and swept later;
    # the permissions of any directory the user creates (mkdtemp's would be 0700)
    tmp = path.parent / (f".{path.name}.{socket.gethostname()}.{os.getpid()}."
                         f"{uuid.uuid4().hex[:12]}.tmp")
    tmp.mkdir(0o777)
    try:
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


STALE_DIR_SECONDS = 24 * 3600


def sweep_stale_dirs(parent: str | os.PathLike, now: float | None = None) -> list[Path]:
    """Remove the unfinished directories of :func:`publish_dir` in ``parent`` whose
    writer is gone: on this host, its pid no longer runs; from another host (a shared
    filesystem), untouched for :data:`STALE_DIR_SECONDS`. Returns what was removed.
    Published directories and running builds are never touched."""
    now = time.time() if now is None else now
    # .<name>.<host>.<pid>.<random>.tmp (the random part has no dots)
    ours = re.compile(rf"\.{re.escape(socket.gethostname())}\.(\d+)\.[^.]+\.tmp$")
    anyone = re.compile(r"\.(\d+)\.[^.]+\.tmp$")
    removed = []
    try:
        entries = [d for d in Path(parent).glob(".*.tmp") if anyone.search(d.name)]
    except OSError:
        return removed
    for d in entries:
        try:
            if not d.is_dir():
                continue
            mine = ours.search(d.name)
            gone = (not _pid_alive(int(mine.group(1))) if mine
                    else now - d.stat().st_mtime >= STALE_DIR_SECONDS)
        except OSError:
            continue
        if gone:
            shutil.rmtree(d, ignore_errors=True)
            removed.append(d)
    return removed


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
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


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """The records of an append-only ``.jsonl`` file a run writes (``spikes.jsonl``,
    ``skipped_batches.jsonl``): a missing file is no records, and a line that is not JSON
    (the unfinished last line of a killed writer) is left out."""
    import json

    path = Path(path)
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records
