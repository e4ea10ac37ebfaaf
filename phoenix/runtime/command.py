"""What every ``phoenix`` command does around its work: per-rank logging, and turning
input errors (and a run directory locked by another job) into one line and exit code 2
with the process groups torn down."""

from __future__ import annotations

import logging
import os
import sys

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


def setup_logging() -> None:
    rank = int(os.environ.get("RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    # Every rank reports warnings; progress comes from rank 0 and the logging rank.
    tag = f"[rank {rank}] " if world > 1 else ""
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s {tag}%(message)s",
                        datefmt="%H:%M:%S", stream=sys.stdout, force=True)
    if rank not in (0, world - 1):
        logging.getLogger().setLevel(logging.WARNING)
    import warnings

    for pattern in _INTERNAL_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)
    for noisy in ("megatron", "torch.distributed"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def run_command(body, input_errors: tuple[type[BaseException], ...] = ()) -> int:
    """Run a command's ``body()``: a ``ConfigError`` or one of ``input_errors`` (e.g. the
    data and checkpoint errors, named by the caller) becomes one line on stderr and exit
    code 2 (no traceback on every rank), and the process groups are always torn down."""
    try:
        return body() or 0
    except ConfigError as e:
        print(f"phoenix: config error: {e}", file=sys.stderr)
        return 2
    except input_errors as e:
        print(f"phoenix: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    except RunLockError as e:  # another job holds the run directory
        print(f"phoenix: {e}", file=sys.stderr)
        return 2
    finally:
        from phoenix.runtime.distributed import shutdown_runtime

        try:
            shutdown_runtime()
        except Exception:
            pass
