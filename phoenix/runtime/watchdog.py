"""Workers launched by torchrun exit when their agent dies: no orphans that keep training.

torchrun's agent starts every worker in a session of its own (``start_new_session``), so
killing the agent, or its whole process group, with SIGKILL leaves the workers running:
they finish the run on their own and race any restart for the run directory. Two
mechanisms stop them:

* ``prctl(PR_SET_PDEATHSIG, SIGKILL)`` (Linux, through ctypes): the kernel kills the
  worker the moment the thread that forked it exits. SIGKILL, not SIGTERM: a worker
  blocked in a collective or in the C++ plan builder could not run a Python handler, and
  with the agent gone the job is over. Nothing is lost but the step in flight, since
  checkpoints and every other file are published atomically; rank 0's run lock is left
  behind with a dead pid, which a restart on the same host takes over at once.
* a daemon thread that polls ``os.getppid()`` every second and exits the process (one
  line on stderr) when the parent changes: the fallback where prctl is missing (not
  Linux) or failed, or where the agent forked the worker from a thread that is still alive.

Only for workers of a torchrun agent (``TORCHELASTIC_RUN_ID`` is in their environment).
A plain ``python -m phoenix.train`` has no agent: its parent is a shell, tmux or a batch
script, whose exit must not end a training job (``nohup``); it is stopped by signals like
any other process.

The helpers a training process starts die with it, under torchrun or not:
:func:`helpers_die_with_this_process` gives every child it forks from its main thread
(megatron's checkpoint shard writers) ``PR_SET_PDEATHSIG``, and :func:`die_with_parent`
is the initializer of the helper processes it spawns (megatron's write-results Manager,
see phoenix.checkpoint.sharded_save). Without them, SIGKILL of the job left these running,
re-parented to init.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import signal
import sys
import threading
import time

log = logging.getLogger(__name__)

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
_watched_parent: int | None = None


def launched_by_torchrun() -> bool:
    """This process is a worker that torchrun's elastic agent started."""
    return "TORCHELASTIC_RUN_ID" in os.environ


def set_parent_death_signal(sig: int = signal.SIGKILL) -> bool:
    """Ask the kernel to send ``sig`` to this process when its parent exits (Linux)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        return libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _parent_gone(parent: int) -> None:
    print(f"phoenix: the torchrun agent (pid {parent}) that started this worker has exited; "
          f"stopping worker pid {os.getpid()}", file=sys.stderr, flush=True)
    os._exit(1)


def _reparented_to_init(parent: int) -> bool:
    """Our parent is pid 1 and pid 1 is no launcher (torchrun is pid 1 in some containers).
    The agent's pid is not in the environment, so this is the one sign of its death before
    the watch began; a re-parenting to another subreaper goes unseen."""
    if parent != 1:
        return False
    try:
        with open("/proc/1/cmdline", "rb") as f:
            cmdline = f.read()
    except OSError:
        return False
    return b"torch" not in cmdline and b"python" not in cmdline


def _watch(parent: int, interval: float) -> None:
    while True:
        time.sleep(interval)
        if os.getppid() != parent:
            _parent_gone(parent)


def exit_with_parent(interval: float = 1.0) -> bool:
    """Under torchrun: make this worker die with its agent (see the module docstring).
    Returns whether it is armed; idempotent; a no-op outside torchrun."""
    global _watched_parent
    if _watched_parent is not None:
        return True
    if not launched_by_torchrun():
        return False
    parent = os.getppid()
    if _reparented_to_init(parent):  # the agent died while this worker was starting up
        _parent_gone(parent)
    if not set_parent_death_signal(signal.SIGKILL):
        log.warning("could not set PR_SET_PDEATHSIG; a thread watches the torchrun agent (pid %d) "
                    "instead", parent)
    if os.getppid() != parent:  # it died between the two calls: the kernel will not tell
        _parent_gone(parent)
    _watched_parent = parent
    threading.Thread(target=_watch, args=(parent, interval), name="phoenix-parent-watchdog",
                     daemon=True).start()
    return True


_main_thread_forks = False
_forking_from_main = False


def _before_fork() -> None:
    global _forking_from_main
    _forking_from_main = threading.current_thread() is threading.main_thread()


def _after_fork_in_child() -> None:
    # Only a child of the main thread: the kernel signals the child when the thread that
    # forked it exits, which for another thread may be long before the process does.
    if _forking_from_main:
        set_parent_death_signal(signal.SIGKILL)


def helpers_die_with_this_process() -> None:
    """From now on, every child this process forks from its main thread is killed
    (SIGKILL) when this process exits: helpers never outlive the job. Idempotent."""
    global _main_thread_forks
    if _main_thread_forks or not hasattr(os, "register_at_fork"):
        return
    os.register_at_fork(before=_before_fork, after_in_child=_after_fork_in_child)
    _main_thread_forks = True


def die_with_parent(parent: int) -> None:
    """The initializer of a helper process that ``parent`` spawned: it is killed when
    ``parent`` exits, and exits at once if ``parent`` is already gone."""
    set_parent_death_signal(signal.SIGKILL)
    if os.getppid() != parent:
        os._exit(1)
