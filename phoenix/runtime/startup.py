"""Start-up checks that every rank agrees on, so a misconfigured job stops at once.

On several nodes, a path can mean different things on different ranks (a relative path
and another working directory, a node-local disk, a mount missing on one node). A rank
that then fails alone leaves the others waiting in the next collective until the
distributed timeout. The helpers here turn such faults into one error on every rank:

* :func:`on_every_rank` runs a check on every rank and, if it fails on any, raises that
  error on all of them (one ``all_gather``), naming the ranks and hosts where it failed.
* :func:`file_views` asks every rank whether it sees a file that rank 0 wrote, holding a
  token rank 0 chose (so an old or another job's file does not count); :func:`dir_views`
  does this for a directory with a throw-away token file. Ranks answer with their hostname
  and the resolved path, so a message can say who sees what.

Without an initialised process group (a world of one, unit tests) they run locally.
"""

from __future__ import annotations

import os
import pickle
import socket
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import torch.distributed as dist

VISIBILITY_WAIT = 10.0
"""Seconds a rank keeps looking for a file rank 0 wrote before it reports that it cannot
see it: NFS clients may cache a directory's earlier listing for a while."""


def _distributed() -> bool:
    return dist.is_initialized() and dist.get_world_size() > 1


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def all_gather(obj) -> list:
    """``obj`` of every rank, by rank (``[obj]`` without a process group)."""
    if not _distributed():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast(obj, src: int = 0):
    """Rank ``src``'s ``obj`` on every rank."""
    if not _distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def _portable(error: BaseException) -> bytes:
    try:
        data = pickle.dumps(error)
        pickle.loads(data)
        return data
    except Exception:
        return pickle.dumps(RuntimeError(f"{type(error).__name__}: {error}"))


def on_every_rank(fn, *args, **kwargs):
    """``fn(*args, **kwargs)`` on this rank; collective. If it raises ``Exception`` on any
    rank, every rank raises: the failing ranks their own error, the others the error of
    the lowest failing rank, with the ranks and hosts where it failed appended."""
    error, result = None, None
    try:
        result = fn(*args, **kwargs)
    except Exception as e:
        error = e
    if not _distributed():
        if error is not None:
            raise error
        return result
    reports = all_gather(None if error is None else (_portable(error), socket.gethostname()))
    failed = [(r, report) for r, report in enumerate(reports) if report is not None]
    if not failed:
        return result
    if error is not None:
        raise error
    first, (data, _) = failed[0]
    try:
        other = pickle.loads(data)
    except Exception:
        other = RuntimeError(f"rank {first} failed")
    where = ", ".join(f"rank {r} on host {host}" for r, (_, host) in failed)
    try:
        raised = type(other)(f"{other} (on {len(failed)} of {len(reports)} ranks: {where})")
    except Exception:
        raised = other
    raise raised from None


@dataclass(frozen=True)
class RankView:
    """What one rank sees of a file rank 0 wrote."""

    rank: int
    host: str
    path: str
    """The directory as this rank resolves it."""
    sees: bool

    def __str__(self) -> str:
        return f"rank {self.rank} on host {self.host} at {self.path}"


def _sees(path: Path, token: str, wait: float) -> bool:
    deadline = time.monotonic() + wait
    while True:
        try:
            if token in path.read_text():
                return True
        except (OSError, UnicodeDecodeError):
            pass
        if time.monotonic() >= deadline:
            return False
        try:  # opening the directory makes an NFS client revalidate its cached listing
            os.listdir(path.parent)
        except OSError:
            pass
        time.sleep(0.5)


def file_views(path: str | Path, token: str, wait: float = VISIBILITY_WAIT) -> list[RankView]:
    """Collective: every rank's view of ``path``, which rank 0 has written with ``token``
    in it (rank 0 sees it by definition; the others look for up to ``wait`` seconds)."""
    path = Path(path)
    rank = _rank()
    sees = rank == 0 or _sees(path, token, wait)
    return all_gather(RankView(rank, socket.gethostname(), str(path.parent.resolve()), sees))


def dir_views(directory: str | Path, wait: float = VISIBILITY_WAIT) -> list[RankView]:
    """Collective: every rank's view of ``directory``, which rank 0 creates. A token file
    with a random name and content is written there by rank 0 and removed afterwards
    (several jobs may share the directory, e.g. a common data cache)."""
    directory = Path(directory)
    token, error = None, None
    if _rank() == 0:
        try:
            directory.mkdir(parents=True, exist_ok=True)
            token = uuid.uuid4().hex
            (directory / f".phoenix-visible-{token}").write_text(token)
        except OSError as e:
            error = f"rank 0 on host {socket.gethostname()} cannot write {directory}: {e}"
    token, error = broadcast((token, error))
    if error is not None:
        raise OSError(error)
    probe = directory / f".phoenix-visible-{token}"
    try:
        return file_views(probe, token, wait)
    finally:
        if _rank() == 0:
            probe.unlink(missing_ok=True)
