"""phoenix reshard: rewrite a dp_reshardable checkpoint so that it loads at any layout.

A checkpoint saved with ``checkpoint.optimizer_format: dp_reshardable`` (the default)
resumes at any data-parallel size, but its optimizer state only at the TP/PP/CP/EP it was
saved with. This command loads it at those degrees with the fewest processes they allow
(it starts them itself with torchrun, on this machine's devices) and writes the same step
as ``fully_reshardable`` into ``OUT/checkpoints/``. ``--out`` may be the source run: its
checkpoint is replaced by the converted one once that is complete, and the run then
resumes at the new layout.

    phoenix reshard RUN_OR_CHECKPOINT --out OUT
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="phoenix reshard", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="a checkpoint folder, or a run folder (its latest)")
    p.add_argument("--out", required=True, help="run folder to write OUT/checkpoints/step_N into "
                                                "(may be the source run)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")

    from phoenix.checkpoint import CheckpointError
    from phoenix.config import ConfigError

    try:
        if "WORLD_SIZE" not in os.environ:  # the launcher: one rank per process it needs
            return _launch(args.checkpoint, args.out)
        from phoenix.checkpoint.reshard import reshard

        out = reshard(args.checkpoint, args.out)
    except (CheckpointError, ConfigError, OSError) as e:
        print(f"phoenix reshard: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    if out is not None and int(os.environ.get("RANK", "0")) == 0:
        print(f"wrote {out} (optimizer state fully_reshardable: loads at any layout)")
    return 0


def _launch(checkpoint: str, out: str) -> int:
    from phoenix.checkpoint.reshard import reshard_world_size, source_of
    from phoenix.config.loader import load_saved_config

    path, _ = source_of(checkpoint)  # refuses a checkpoint that needs no conversion
    world = reshard_world_size(load_saved_config(path / "config.yaml").parallel)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
           str(world), "-m", "phoenix.cli", "reshard", str(path), "--out", str(out)]
    return subprocess.run(cmd).returncode


if __name__ == "__main__":
    sys.exit(main())
