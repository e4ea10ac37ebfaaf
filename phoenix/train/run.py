"""Entry point of a training run: ``torchrun ... -m phoenix.train CONFIG.yaml [k=v ...]``."""

from __future__ import annotations

import argparse
import logging
import os

from phoenix.checkpoint import CheckpointSaveError
from phoenix.checkpoint.store import CheckpointError
from phoenix.config import ConfigError, load_config
from phoenix.data.indexed import DataError
from phoenix.runtime.command import HelpFormatter, log_progress_from, setup_logging
from phoenix.runtime.command import run_command as _run_command
from phoenix.runtime.world_fit import fits, layout_hint
from phoenix.train.dry_run import dry_run
from phoenix.train.trainer import NonFiniteLossError

log = logging.getLogger("phoenix")


def train(cfg):
    """Run a whole training job in this process (one rank of the torchrun world)."""
    from phoenix.runtime import init_runtime
    from phoenix.train.trainer import Trainer

    layout = init_runtime(cfg)
    trainer = Trainer(cfg, layout)
    try:
        trainer.setup()
        log_progress_from(layout)  # the set-up lines came from rank 0; the steps' from here
        trainer.train()
    finally:
        if trainer.run_lock is not None:  # when setup failed after taking it
            trainer.run_lock.release()
    return trainer


def run_command(body) -> int:
    """:func:`phoenix.runtime.command.run_command` with the data and checkpoint input
    errors (one line on stderr, exit code 2), the non-finite stop and a failed save (exit
    code 3)."""
    return _run_command(body, (DataError, CheckpointError),
                        stop_errors=(NonFiniteLossError, CheckpointSaveError))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(formatter_class=HelpFormatter,
        prog="phoenix train",
        description="Train from a YAML recipe; launch under torchrun for several processes.")
    parser.add_argument("config", help="recipe YAML")
    parser.add_argument("overrides", nargs="*", default=[], metavar="key=value",
                        help="dotted overrides, none needed, e.g. train.steps=100")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the resolved config, check the layout (for $WORLD_SIZE, else "
                             "the smallest world it fits), the installed packages, init_from's "
                             "vocabulary and shapes and (resuming) the config changes against "
                             "the checkpoint, then exit")
    args = parser.parse_intermixed_args(argv)
    setup_logging()

    def body():
        cfg = load_config(args.config, args.overrides)
        if args.dry_run:
            return dry_run(cfg)
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if not fits(cfg.parallel, world):  # say how to launch it, before any process group
            try:
                cfg.validate_layout(world)
            except ConfigError as e:
                raise ConfigError(f"{e}; {layout_hint(cfg, world, args.config, args.overrides)}") \
                    from None
        train(cfg)

    return run_command(body)
