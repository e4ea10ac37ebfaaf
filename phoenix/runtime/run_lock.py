"""One job per run directory: an exclusive lock file that works on NFS.

A training job holds ``<output_dir>/.phoenix.lock`` from before its first write into the
run directory until it exits. A second job on the same directory is refused with one line
naming the holder's host and pid (:class:`RunLockError`), so two jobs can never both write
checkpoints and race on ``latest``.

Why a lock *file* and not ``fcntl``/``flock``: run directories live on shared filesystems
(NFS, Lustre, GPFS), where byte-range and flock locks are emulated, disabled or silently
node-local depending on the mount, and a lock held by a dead client may never be freed.
What every such filesystem does provide atomically is creating a hard link:

* the record (host, pid, start time, heartbeat, a random token) is written to a private
  temporary file, then ``os.link``-ed to the lock name. The link either creates the lock
  whole or fails because it exists, so nobody ever reads a half-written lock. Over NFS the
  reply to a successful LINK can be lost and the retry answer EEXIST, so success is judged
  by the temporary file's link count being 2 (the classic recipe of ``open(2)``, O_EXCL).
  Filesystems without hard links fall back to ``O_CREAT | O_EXCL``.
* a thread refreshes the heartbeat every ``heartbeat_interval`` seconds (write a temporary
  file, ``os.replace`` it over the lock: atomic on NFS too), after checking that the lock
  still carries this job's token.
* a lock is *stale*, and is taken over with a log line, when its holder is on this machine
  (same hostname, boot id and pid namespace) and its pid is gone (or is a zombie, or was
  reused by a younger process), or, for a holder on another machine, when its heartbeat is
  older than ``stale_after`` seconds (clocks are assumed synchronised to well within that).
  A live holder on this machine is never taken over, however old its heartbeat. A lock
  left by an earlier attempt of the same torchrun job (same ``TORCHELASTIC_RUN_ID``, lower
  restart count) is stale at once: the agents stop every worker of an attempt before the
  next one starts, and the new rank 0 may be on another node.
* a takeover renames the stale lock away (only one contender's rename succeeds) and then
  creates a fresh one as above. Should a holder ever find its token replaced (it was
  suspended past ``stale_after`` and another job took over), it stops at once with one
  line: two jobs must not train into one directory.

Only global rank 0 takes the lock (:func:`claim_run_dir`); every rank learns the outcome
from one broadcast, and every rank then reads the lock back to prove that it sees the same
run directory (a node-local ``output_dir`` fails here, with one message on every rank).
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import socket
import sys
import threading
import time
import uuid
from pathlib import Path

from phoenix.config import ConfigError
from phoenix.runtime.startup import broadcast, file_views

log = logging.getLogger(__name__)

LOCK_NAME = ".phoenix.lock"
HEARTBEAT_INTERVAL = 30.0
"""Seconds between heartbeats of the holder."""
STALE_AFTER = 300.0
"""A heartbeat this old (seconds) makes the lock of a holder on another machine stale."""


class RunLockError(RuntimeError):
    """The run directory is locked by another live job (the message names its host and pid)."""


def _read_first_line(path: str) -> str:
    try:
        with open(path) as f:
            return f.readline().strip()
    except OSError:
        return ""


def _machine_id() -> str:
    """Boot id and pid namespace: two hosts (or containers) sharing a hostname differ here,
    and a pid is only meaningful inside one of them."""
    boot = _read_first_line("/proc/sys/kernel/random/boot_id")
    try:
        pidns = os.readlink("/proc/self/ns/pid")
    except OSError:
        pidns = ""
    return f"{boot}/{pidns}"


def _process_start(pid: int) -> str:
    """Start time of ``pid`` in clock ticks since boot ('' where /proc is unavailable)."""
    stat = _read_first_line(f"/proc/{pid}/stat")
    if not stat:
        return ""
    return stat.rsplit(")", 1)[1].split()[19]  # field 22 of proc(5); the name may hold spaces


def pid_alive(pid: int, start: str = "") -> bool:
    """``pid`` runs on this machine (not a zombie; the same process when ``start`` is given)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # another user's process: it exists
    stat = _read_first_line(f"/proc/{pid}/stat")
    if stat:
        fields = stat.rsplit(")", 1)[1].split()
        if fields[0] in ("Z", "X"):
            return False
        if start and fields[19] != start:
            return False  # the pid was reused by a younger process
    return True


class RunLock:
    """An exclusive lock on one run directory (see the module docstring).

    ``acquire()`` raises :class:`RunLockError` naming the holder when another live job holds
    it; ``release()`` is idempotent and also runs at interpreter exit.
    """

    def __init__(self, run_dir: str | Path, heartbeat_interval: float = HEARTBEAT_INTERVAL,
                 stale_after: float = STALE_AFTER):
        self.path = Path(run_dir) / LOCK_NAME
        self.heartbeat_interval, self.stale_after = heartbeat_interval, stale_after
        self.token = uuid.uuid4().hex
        self.record = {"host": socket.gethostname(), "pid": os.getpid(),
                       "machine": _machine_id(), "process_start": _process_start(os.getpid()),
                       "started": time.time(), "heartbeat": time.time(), "token": self.token,
                       "torchrun_run_id": os.environ.get("TORCHELASTIC_RUN_ID"),
                       "torchrun_restart": int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0))}
        self.held = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- acquiring --------------------------------------------------------------------
    def acquire(self) -> "RunLock":
        for _ in range(10):  # a few rounds: contenders may race on a stale lock
            self.record["heartbeat"] = time.time()
            if self._create():
                self._start_heartbeat()
                return self
            holder = self._read()
            if holder is None:
                continue  # released between our attempt and the read: try again
            reason = self._stale_reason(holder)
            if reason is None:
                raise RunLockError(self._describe_holder(holder))
            self._take_over(holder, reason)
        raise RunLockError(f"could not take the run lock {self.path}: other jobs keep racing for it")

    def _write_tmp(self) -> Path:
        tmp = self.path.with_name(f"{LOCK_NAME}.{self.record['host']}.{os.getpid()}.{uuid.uuid4().hex[:8]}")
        with open(tmp, "w") as f:
            json.dump(self.record, f)
            f.flush()
            os.fsync(f.fileno())
        return tmp

    def _create(self) -> bool:
        """Create the lock with our record; False if it exists."""
        tmp = self._write_tmp()
        try:
            try:
                os.link(tmp, self.path)
            except FileExistsError:
                pass  # judged by the link count below (NFS may answer EEXIST to our own link)
            except OSError:
                if os.stat(tmp).st_nlink != 2:
                    return self._create_exclusive()  # no hard links on this filesystem
            return os.stat(tmp).st_nlink == 2
        finally:
            os.unlink(tmp)

    def _create_exclusive(self) -> bool:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            json.dump(self.record, f)
            f.flush()
            os.fsync(f.fileno())
        return True

    def _read(self) -> dict | None:
        """The lock's record; None if there is no lock, ``{}`` if it cannot be parsed."""
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return None
        try:
            record = json.loads(text)
            return record if isinstance(record, dict) else {}
        except ValueError:
            return {}  # empty or torn: being written by an O_EXCL creator, or garbage

    def _stale_reason(self, holder: dict) -> str | None:
        """Why ``holder``'s lock may be taken over; None while it is held."""
        age = time.time() - float(holder.get("heartbeat", 0) or 0)
        if not holder:
            try:
                age = time.time() - self.path.stat().st_mtime
            except FileNotFoundError:
                return "it is gone"
            return f"unreadable and {age:.0f}s old" if age > self.stale_after else None
        run_id = self.record["torchrun_run_id"]
        if run_id and holder.get("torchrun_run_id") == run_id \
                and int(holder.get("torchrun_restart") or 0) < self.record["torchrun_restart"]:
            # torchrun stops every worker of an attempt before it starts the next one (whose
            # rank 0 may be on another node); a run id is not shared by two live jobs.
            return f"an earlier attempt (restart {holder.get('torchrun_restart')}) of this torchrun job"
        if holder.get("host") == self.record["host"] and holder.get("machine") == self.record["machine"]:
            pid = int(holder.get("pid", -1))
            if pid == os.getpid():
                return "left by this process"
            if not pid_alive(pid, holder.get("process_start", "")):
                return f"pid {pid} is gone"
            return None
        if age > self.stale_after:
            return f"its heartbeat is {age:.0f}s old (more than {self.stale_after:.0f}s)"
        return None

    def _take_over(self, holder: dict, reason: str) -> None:
        moved = self.path.with_name(f"{LOCK_NAME}.stale.{uuid.uuid4().hex[:8]}")
        try:
            os.rename(self.path, moved)
        except FileNotFoundError:
            return  # another contender moved it first: compete for the new one
        try:
            if self._read_file(moved).get("token") != holder.get("token") and holder:
                # The holder refreshed in between: it is alive. Put its lock back.
                try:
                    os.link(moved, self.path)
                except OSError:
                    pass
                return
            log.warning("run lock: taking over the stale lock %s of host %s pid %s (%s)", self.path,
                        holder.get("host", "?"), holder.get("pid", "?"), reason)
        finally:
            try:
                os.unlink(moved)
            except FileNotFoundError:
                pass

    @staticmethod
    def _read_file(path: Path) -> dict:
        try:
            record = json.loads(path.read_text())
            return record if isinstance(record, dict) else {}
        except (OSError, ValueError):
            return {}

    def _describe_holder(self, holder: dict) -> str:
        if not holder:
            return (f"output_dir {self.path.parent} is locked by another job (lock file {self.path} "
                    f"is being written or unreadable); if no job uses this directory, delete it")
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(holder.get("started", 0))))
        beat = time.time() - float(holder.get("heartbeat", 0))
        return (f"output_dir {self.path.parent} is in use by another job: host {holder.get('host')}, "
                f"pid {holder.get('pid')}, started {started}, last heartbeat {beat:.0f}s ago "
                f"(lock file {self.path}); stop that job first, or delete the lock file if it "
                f"is certainly dead")

    # -- holding ----------------------------------------------------------------------
    def _start_heartbeat(self) -> None:
        self.held = True
        self._stop.clear()
        self._thread = threading.Thread(target=self._heartbeat, name="phoenix-run-lock",
                                        daemon=True)
        self._thread.start()
        atexit.register(self.release)

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.heartbeat_interval):
            try:
                self.refresh()
            except OSError as e:  # e.g. a transient NFS error: the next beat retries
                log.warning("run lock: could not refresh %s: %s", self.path, e)

    def refresh(self) -> None:
        """Renew the heartbeat; stop the process if another job has taken the lock over.

        The new record is written (and fsynced) before the lock is read, so only the
        instant between that read and the rename could overwrite a takeover; the job that
        took over would then find its token gone at its next beat and stop: one survives."""
        self.record["heartbeat"] = time.time()
        tmp = self._write_tmp()
        try:
            current = self._read()
            if current is None:  # deleted by hand: recreate it if nobody else has
                if self._create():
                    log.warning("run lock: %s had been removed; recreated it", self.path)
                    return
                current = self._read() or {}
            if not current:
                return  # unreadable for a moment (a lock being written): look again next beat
            if current.get("token") != self.token:
                if self._stop.is_set():
                    return
                print(f"phoenix: the run lock {self.path} was taken over by host "
                      f"{current.get('host')} pid {current.get('pid')} (this job's heartbeat had "
                      f"stopped); stopping this job so that two jobs never write one run "
                      f"directory", file=sys.stderr, flush=True)
                tmp.unlink()
                os._exit(2)
            os.replace(tmp, self.path)
        finally:
            if tmp.exists():
                tmp.unlink()

    def release(self) -> None:
        """Stop the heartbeat and remove the lock if it is still ours (idempotent)."""
        if not self.held:
            return
        self.held = False
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=10)
        atexit.unregister(self.release)
        current = self._read()
        if current is not None and current.get("token") == self.token:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass


def live_holder(run_dir: str | Path) -> dict | None:
    """The record of the live job that holds ``run_dir``'s lock; None when nobody holds it
    or its holder is gone (a stale lock). Only reads: e.g. to clean up after a dead job
    before the lock can be taken (on a full disk even the lock file cannot be written)."""
    lock = RunLock(run_dir)
    holder = lock._read()
    if holder is None or lock._stale_reason(holder) is not None:
        return None
    return holder


def claim_run_dir(run_dir: str | Path, rank: int) -> RunLock | None:
    """Collective: global rank 0 creates ``run_dir`` and locks it; every rank learns the
    outcome (one broadcast) and then checks that it sees the same directory.

    Returns the lock on rank 0 (``None`` elsewhere). Raises on every rank:
    :class:`RunLockError` naming the holder when another job holds the directory, or
    ConfigError naming ``output_dir`` when some ranks do not see rank 0's directory.
    """
    run_dir = Path(run_dir)
    lock, outcome = None, [None, None]  # [refusal message, lock token]
    if rank == 0:
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            lock = RunLock(run_dir).acquire()
            outcome = [None, lock.token]
        except RunLockError as e:
            outcome = [str(e), None]
        except OSError as e:
            outcome = [f"output_dir: cannot create or lock {run_dir}: {e}", None]
    outcome = broadcast(outcome)
    if outcome[0] is not None:
        raise RunLockError(outcome[0])
    try:
        views = file_views(run_dir / LOCK_NAME, outcome[1])
        blind = [v for v in views if not v.sees]
        if blind:
            raise ConfigError(
                f"output_dir: rank 0 on host {views[0].host} created the run directory "
                f"{views[0].path}, but {', '.join(map(str, blind))} cannot see it; output_dir "
                f"must be one directory that every node mounts at the same path (an absolute "
                f"path on a shared filesystem)")
    except BaseException:
        if lock is not None:
            lock.release()
        raise
    return lock
