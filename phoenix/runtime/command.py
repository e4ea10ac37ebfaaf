"""What every ``phoenix`` command does around its work: per-rank logging, and turning
input errors (and a run directory locked by another job) into one line and exit code 2
with the process groups torn down.

Who prints, in a job of several processes:

* warnings: every rank, tagged ``[rank N]``, except those every rank computes alike (the
  config's, the data plan's, the device backend's: ``JOB_WIDE_LOGGERS``), said by rank 0;
* set-up lines (INFO): global rank 0, and the first rank of every other node (what a node
  did on its own disks, e.g. a node-local data cache);
* progress lines (``step N/M | loss ...``, eval results): the logging rank (last pipeline
  stage, TP 0, DP 0), known once the layout exists (:func:`log_progress_from`);
* an input error: once per job (:func:`say_once`).
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import sys
import time
from datetime import timedelta

from phoenix.config import ConfigError
from phoenix.runtime.run_lock import RunLockError

# Deprecation notices raised inside megatron-core and torch.distributed on every run;
# nothing a user can act on, and they bury the progress lines.
_INTERNAL_WARNINGS = (
    r".*torch\.distributed\.(reduce_scatter_tensor|all_gather_into_tensor)` is deprecated.*",
    r".*deprecating ShardedTensor.*",
    r".*`load_state_dict` is deprecated.*",
    r".*\.grad attribute of a Tensor that is not a leaf Tensor.*",
    r".*full scope is deprecated.*",
)

ERROR_WAIT = 10.0
"""Seconds a failing rank waits to learn whether every rank (or rank 0) failed too: ranks
that stop on the same error reach it within this of each other, start-up included."""


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """``--help`` of every command: descriptions and epilogs as written (their examples,
    backslash continuations included, paste into a shell as they are), and each option's
    default when it has one worth saying (not None, not a flag's False) and its help does
    not already say it."""

    def _get_help_string(self, action):
        text = action.help or ""
        default = action.default
        if (default in (None, False, argparse.SUPPRESS) or "default" in text
                or not action.option_strings or isinstance(default, bool)):
            return text
        shown = ",".join(map(str, default)) if isinstance(default, (list, tuple)) else default
        return f"{text} (default: {shown})" if text else f"default: {shown}"


def _rank_world() -> tuple[int, int]:
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


JOB_WIDE_LOGGERS = ("phoenix.config", "phoenix.data.stage_plans", "phoenix.data.plan_groups",
                    "phoenix.runtime.cpu_backend")
"""Loggers whose lines every rank computes alike (from the config, the deterministic data
plan, the device backend): global rank 0 says them once for the job."""


class _OncePerJob(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.name.startswith(JOB_WIDE_LOGGERS)


def setup_logging() -> None:
    rank, world = _rank_world()
    tag = f"[rank {rank}] " if world > 1 else ""
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s {tag}%(message)s",
                        datefmt="%H:%M:%S", stream=sys.stdout, force=True)
    if rank != 0:  # rank 0 says the job-wide lines; the others would repeat them
        for handler in logging.getLogger().handlers:
            handler.addFilter(_OncePerJob())
    # Set-up lines from rank 0 and the first rank of each node; every rank's warnings.
    if rank != 0 and os.environ.get("LOCAL_RANK", "0") != "0":
        logging.getLogger().setLevel(logging.WARNING)
    import warnings

    for pattern in _INTERNAL_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)
    for noisy in ("megatron", "torch.distributed"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def log_progress_from(layout) -> None:
    """Once the layout exists: the logging rank (which writes the step lines, wherever
    the layout puts it) logs INFO too."""
    if layout.is_logging_rank:
        logging.getLogger().setLevel(logging.INFO)


def _job_store():
    """A client of the job's key-value store: torchrun's agent store (there before any
    process group), or rank 0's once the process group exists; None without either."""
    import torch.distributed as dist

    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True" and not dist.is_initialized():
        return None
    try:
        return dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]),
                             is_master=False, timeout=timedelta(seconds=ERROR_WAIT),
                             wait_for_workers=False)
    except Exception:
        return None


def say_once(message: str) -> bool:
    """Print ``message`` (an error that stops this rank) on stderr once per job, and
    return whether every rank stopped on an error (so the tear-down's barrier is met).

    Ranks that fail together (most input errors are raised on every rank at once) leave
    it to rank 0; a rank that fails without rank 0 prints it itself (the first such one),
    ``[rank N]``-tagged. Failing ranks tell each other through the job's store; without
    one (not under torchrun, before the process group) every failing rank prints."""
    rank, world = _rank_world()
    if world == 1:
        print(message, file=sys.stderr, flush=True)
        return True
    line = f"[rank {rank}] {message}"
    store = _job_store()
    if store is None:
        print(line, file=sys.stderr, flush=True)
        return True
    key = (f"phoenix/failed/{os.environ.get('TORCHELASTIC_RUN_ID', '')}/"
           f"{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}")
    printed = False
    try:
        store.set(f"{key}/rank{rank}", "1")
        failed = store.add(f"{key}/count", 1)
        if rank == 0:
            print(line, file=sys.stderr, flush=True)
            printed = True
        deadline = time.monotonic() + ERROR_WAIT
        while failed < world and time.monotonic() < deadline:
            time.sleep(0.05)
            failed = store.add(f"{key}/count", 0)
        if not printed and not store.check([f"{key}/rank0"]) \
                and store.add(f"{key}/printed", 1) == 1:
            print(line, file=sys.stderr, flush=True)
            printed = True
        return failed >= world
    except Exception:  # the store is gone (its host exited): say it rather than nothing
        if not printed:
            print(line, file=sys.stderr, flush=True)
        return False


def run_command(body, input_errors: tuple[type[BaseException], ...] = (),
                stop_errors: tuple[type[BaseException], ...] = ()) -> int:
    """Run a command's ``body()``: a ``ConfigError``, a ``RunLockError`` (another job
    holds the run directory) or one of ``input_errors`` (e.g. the data and checkpoint
    errors, named by the caller) becomes one line on stderr and exit code 2, one of
    ``stop_errors`` or a full disk (``ENOSPC``/``EDQUOT``) one line and exit code 3 (no
    traceback on every rank; the line once per job, :func:`say_once`), and the process
    groups are torn down. Ctrl-C (a ``KeyboardInterrupt``: during training SIGINT stops
    cleanly instead, see phoenix.runtime.preemption) is one line and exit code 130."""
    together = True  # every rank gets to the tear-down
    try:
        return body() or 0
    except KeyboardInterrupt:  # Ctrl-C before training began (in training it stops cleanly)
        if _rank_world()[0] == 0:  # every rank was told
            print("phoenix: interrupted (SIGINT) before training began; nothing was saved",
                  file=sys.stderr, flush=True)
        together = False
        return 130
    except BrokenPipeError:  # stdout's reader is gone (`phoenix inspect-batch ... | head`):
        # nothing left to say to anyone; stdout points at /dev/null so that the
        # interpreter's last flush does not fail again on the closed pipe
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        where = f" writing {e.filename}" if e.filename else ""
        together = say_once(f"phoenix: stopped: {e.strerror}{where}")
        return 3
    except (ConfigError, RunLockError, *input_errors, *stop_errors) as e:
        if isinstance(e, stop_errors):
            code, message = 3, f"phoenix: stopped: {e}"
        elif isinstance(e, ConfigError):
            code, message = 2, f"phoenix: config error: {e}"
        elif isinstance(e, RunLockError):
            code, message = 2, f"phoenix: {e}"
        else:
            code, message = 2, f"phoenix: {type(e).__name__}: {e}"
        together = say_once(message)
        return code
    finally:
        from phoenix.runtime.distributed import shutdown_runtime

        try:
            if together:  # else a barrier no other rank comes to: exit, torchrun stops them
                shutdown_runtime()
        except Exception:
            pass
