"""``phoenix describe``: size, FLOPs and memory per GPU of a recipe, before any hardware.

    phoenix describe CONFIG.yaml [key=value ...] [--world-size N] [--vocab-size V] [--json]
                     [--gpu-memory GIB]

Prints total and active parameters (MoE: the routed experts a token is not sent to are
not active), the training FLOPs per token (forward + backward, the convention of
``3_throughput/tflops_per_gpu``), and the memory of the most loaded GPU for the recipe's
layout at ``--world-size`` GPUs (default ``$WORLD_SIZE``, else the smallest world the
layout fits): weights, gradients, optimizer states with and without the distributed
optimizer, activations per micro-batch and in flight, logits. The counts and formulas
are in :mod:`phoenix.model.size`. The sequence length and batch are those of the
recipe's longest stage. The vocabulary is ``model.vocab_size``, else ``--vocab-size``,
else the tokenizer's (when its file exists). ``--gpu-memory GIB`` adds a fit verdict: whether
the estimate fits that much per GPU and, if not, the smallest change that does (activation
recompute, then a larger TP, then a larger PP; phoenix.train.describe.fit_verdict).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from phoenix.config import ConfigError, load_config
from phoenix.runtime.command import HelpFormatter
from phoenix.runtime.world_fit import smallest_world


def main(argv: list[str] | None = None) -> int:
    from phoenix.train.describe import (describe, fit_verdict, format_description,
                                        format_fit, require_vocab_size)

    parser = argparse.ArgumentParser(formatter_class=HelpFormatter,
                                     prog="phoenix describe", description=__doc__.split("\n\n")[0])
    parser.add_argument("config", help="recipe YAML")
    parser.add_argument("overrides", nargs="*", default=[],
                        help="dotted overrides, e.g. parallel.tensor=8")
    parser.add_argument("--world-size", type=int, default=None,
                        help="GPUs of the run (default $WORLD_SIZE, else the smallest world the layout "
                             "fits: PP x lcm(TP x CP, EP x ETP))")
    parser.add_argument("--vocab-size", type=int, default=None,
                        help="vocabulary when model.vocab_size is not set")
    parser.add_argument("--json", action="store_true", help="print the numbers as JSON")
    parser.add_argument("--gpu-memory", type=float, default=None, metavar="GIB",
                        help="GiB per GPU: print whether the run fits and, if not, the smallest "
                             "change that does (recompute, then TP, then PP)")
    args = parser.parse_intermixed_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        world = (args.world_size or int(os.environ.get("WORLD_SIZE", 0))
                 or smallest_world(cfg.parallel))
        vocab = require_vocab_size(cfg, args.vocab_size)
        d = describe(cfg, world, vocab)
        if args.gpu_memory is not None:
            d["fit"] = fit_verdict(lambda extra: load_config(args.config, args.overrides + extra),
                                   world, vocab, args.gpu_memory)
    except (ConfigError, OSError) as e:
        print(f"phoenix describe: error: {e}", file=sys.stderr)
        return 2
    text = format_description(d) + ("\n" + format_fit(d["fit"]) if "fit" in d else "")
    print(json.dumps(d, indent=2) if args.json else text)
    return 0
