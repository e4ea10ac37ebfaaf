"""Entry point of a training run: ``torchrun ... -m phoenix.train CONFIG.yaml [k=v ...]``."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from phoenix.checkpoint import CheckpointSaveError, plan_restore
from phoenix.checkpoint.store import CheckpointError
from phoenix.config import dump_config, load_config
from phoenix.data.indexed import DataError
from phoenix.runtime.capabilities import check_capabilities
from phoenix.runtime.command import log_progress_from, setup_logging
from phoenix.runtime.command import run_command as _run_command
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


def _print_plan_summary(cfg) -> None:
    """--dry-run: size, FLOPs and memory per GPU on stderr (stdout is the config)."""
    from phoenix.train.describe import describe, format_description, vocab_size_of

    vocab = vocab_size_of(cfg)
    if vocab is None:
        print("# size and memory: unknown vocabulary (set model.vocab_size)", file=sys.stderr)
        return
    summary = format_description(describe(cfg, int(os.environ.get("WORLD_SIZE", "1")), vocab))
    print("".join(f"# {line}\n" for line in summary.splitlines()), end="", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="phoenix train",
        description="Train from a YAML recipe; launch under torchrun for several processes.")
    parser.add_argument("config", help="recipe YAML")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.steps=100")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the resolved config, check the layout, the installed packages "
                             "and (resuming) the config changes against the checkpoint, then exit")
    args = parser.parse_intermixed_args(argv)
    setup_logging()

    def body():
        cfg = load_config(args.config, args.overrides)
        if args.dry_run:
            cfg.validate_layout(int(os.environ.get("WORLD_SIZE", "1")))
            check_capabilities(cfg)
            # Where the run would start from, and (resuming) whether the checkpoint's run
            # allows every config change: the same refusals as the real start.
            restore = plan_restore(cfg)
            print(dump_config(cfg), end="")
            _print_plan_summary(cfg)
            if restore.kind != "fresh":
                print(f"# would {restore.kind.replace('_', ' ')} {restore.path}"
                      + "".join(f"\n# honoured change: {c}" for c in restore.honoured)
                      + "".join(f"\n# data change (implicit stage boundary): {c}"
                                for c in restore.data_changed), file=sys.stderr)
            return 0
        train(cfg)

    return run_command(body)
