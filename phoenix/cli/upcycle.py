"""``phoenix upcycle``: a dense phoenix checkpoint as a MoE checkpoint.

    phoenix upcycle DENSE_CKPT MOE_CONFIG OUT [key=value ...] [--seed N]

Every expert starts as a copy of the dense MLP (or, with expert ffn_hidden_size = dense
ffn_hidden_size / g, as one of g scaled segments of it: granular upcycling, arXiv
2410.07524); the router is initialised as megatron does; every other weight is copied,
including the MLPs of dense layers in a mixed ``model.moe.layer_freq`` pattern. MOE_CONFIG
is a recipe with a ``model.moe`` section (or a model preset file); the overrides apply to
it. Writes OUT/checkpoints/step_000000 (TP=PP=EP=1; ``checkpoint.init_from: OUT`` loads it
at any TP/PP/EP), OUT/model.yaml and OUT/upcycle.json. Runs in one process on CPU, never
leaves a partial OUT behind; a config the dense weights do not fit is refused in one line
(exit status 2). See phoenix/model/upcycling.py for the mapping and the scale.
"""

from __future__ import annotations

import argparse
import logging
import sys

from phoenix.runtime.command import HelpFormatter


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(formatter_class=HelpFormatter,
                                prog="phoenix upcycle", description=__doc__)
    p.add_argument("dense_checkpoint", help="a checkpoint folder, or a run folder (its latest)")
    p.add_argument("moe_config", help="recipe (or model preset) YAML with model.moe")
    p.add_argument("out", help="output folder (must not exist)")
    p.add_argument("overrides", nargs="*", default=[],
                   help="dotted key=value overrides of MOE_CONFIG")
    p.add_argument("--seed", type=int, default=None,
                   help="seed of the router init (default: MOE_CONFIG's train.seed, else 1234)")
    args = p.parse_intermixed_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")

    from phoenix.checkpoint import CheckpointError
    from phoenix.config import ConfigError
    from phoenix.convert import ConversionError
    from phoenix.convert.upcycle import upcycle
    from phoenix.model.upcycling import UpcycleError

    try:
        out = upcycle(args.dense_checkpoint, args.moe_config, args.out,
                      overrides=args.overrides, seed=args.seed)
    except (UpcycleError, ConversionError, ConfigError, CheckpointError, OSError) as e:
        message = " ".join(str(e).split())  # one line, whatever the source's message
        print(f"phoenix upcycle: error: {message}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
