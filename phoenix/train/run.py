"""Entry point of a training run: ``torchrun ... -m phoenix.train CONFIG.yaml [k=v ...]``."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from phoenix.checkpoint.manager import CheckpointError
from phoenix.config import ConfigError, dump_config, load_config
from phoenix.data.indexed import DataError
from phoenix.train.trainer import NonFiniteLossError

log = logging.getLogger("phoenix")


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


def train(cfg):
    """Run a whole training job in this process (one rank of the torchrun world)."""
    from phoenix.runtime import init_runtime
    from phoenix.train.trainer import Trainer

    layout = init_runtime(cfg)
    trainer = Trainer(cfg, layout)
    trainer.setup()
    trainer.train()
    return trainer


def run_command(body) -> int:
    """Run a command's ``body()``: input errors become one line on stderr and exit code 2
    (no traceback on every rank), and the process groups are always torn down."""
    try:
        return body() or 0
    except ConfigError as e:
        print(f"phoenix: config error: {e}", file=sys.stderr)
        return 2
    except (DataError, CheckpointError) as e:
        print(f"phoenix: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    except NonFiniteLossError as e:
        print(f"phoenix: stopped: {e}", file=sys.stderr)
        return 3
    finally:
        from phoenix.runtime import shutdown_runtime

        try:
            shutdown_runtime()
        except Exception:
            pass


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="phoenix train",
        description="Train from a YAML recipe; launch under torchrun for several processes.")
    parser.add_argument("config", help="recipe YAML")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.steps=100")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the resolved config and check the layout, then exit")
    args = parser.parse_args(argv)
    setup_logging()

    def body():
        cfg = load_config(args.config, args.overrides)
        if args.dry_run:
            cfg.validate_layout(int(os.environ.get("WORLD_SIZE", "1")))
            print(dump_config(cfg), end="")
            return 0
        train(cfg)

    return run_command(body)
