"""``phoenix build-plan``: build (and cache) the data plans of a recipe before the
training job starts.

    phoenix build-plan CONFIG.yaml [dotted.key=value ...] [--dump-batch K]

Prints, for every stage of the recipe (one plan each) and per dataset: weight, whether it comes in bursts (min_share), samples used,
epochs consumed, batches present, min/max samples per batch, groups kept whole (of the
groups that fit the batch where they start) and the loss-bearing fraction of its tokens.
The plan is written to the run's data cache (``data.cache_dir``, default
``OUTPUT_DIR/data_cache``) under a fingerprint of its inputs; the trainer then loads it.
``--dump-batch K`` also lists the samples of global batch K (dataset, sample, group,
first document).
"""

from __future__ import annotations

import argparse
import logging
import sys

from phoenix.config import ConfigError, load_config
from phoenix.data.indexed import DataError
from phoenix.runtime.command import HelpFormatter


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(formatter_class=HelpFormatter,
        prog="phoenix build-plan", description=__doc__.split("\n\n")[0],
        epilog="Columns: min/b, max/b = samples per batch where present; groups whole/fit = "
               "groups kept whole / groups that fit the batch where they start ('units' with "
               "pack_groups: units of groups, each kept whole like a group); loss tokens "
               "= fraction of label positions that carry loss (the rest pads a group's or "
               "unit's last sample).")
    parser.add_argument("config", help="recipe YAML")
    parser.add_argument("overrides", nargs="*", default=[],
                        help="dotted overrides, e.g. train.steps=100")
    parser.add_argument("--dump-batch", type=int, action="append", default=[],
                        help="list the samples of this global batch (repeatable)")
    args = parser.parse_intermixed_args(argv)
    from phoenix.data.indexed import data_only_process

    data_only_process()  # a data tool: megatron-core without compiled kernels (start-up)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("megatron").setLevel(logging.WARNING)
    try:
        cfg = load_config(args.config, args.overrides)
        from phoenix.data.plan_cache import cache_dir, run_stage_plans
        from phoenix.data.plan_source import load_or_build_plan, summary_table
        from phoenix.data.stage_plans import plan_at_step

        paths = []

        def get_plan(inputs):
            plan, path = load_or_build_plan(inputs, cache_dir(cfg))
            paths.append(path)
            return plan

        plans = run_stage_plans(cfg, get_plan)
    except (ConfigError, DataError, ValueError) as e:
        print(f"phoenix build-plan: error: {e}", file=sys.stderr)
        return 2
    for (spi, plan), path in zip(plans, paths):
        st = spi.stage
        print(f"stage {st.index} '{st.name}': steps [{st.start_step}, {st.end_step}), plan {path}  "
              f"({plan.num_batches} batches x {plan.global_batch_size} samples, seq_length "
              f"{st.seq_length}, allocator {plan.allocator}"
              + (f", mixture warmup {st.warmup_steps} steps" if st.warmup_steps else "") + ")")
        print(summary_table(plan, spi.indices))
    for k in args.dump_batch:
        if not 0 <= k < cfg.train.steps:
            print(f"phoenix build-plan: error: batch {k} is not in [0, {cfg.train.steps})",
                  file=sys.stderr)
            return 2
        spi, plan, local = plan_at_step(plans, k)
        print(f"\nbatch {k} (stage '{spi.stage.name}'): position dataset sample group document")
        ds_ids, sample_ids = plan.batch(local)
        for j, (d, s) in enumerate(zip(ds_ids, sample_ids)):
            ix = spi.indices[int(d)]
            group = int(ix.group_ids[s]) if ix.group_ids is not None else -1
            print(f"  {j:4d} {plan.names[int(d)]:>12} {int(s):8d} {group:6d} "
                  f"{ix.document_of(int(ix.starts[s])):8d}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
