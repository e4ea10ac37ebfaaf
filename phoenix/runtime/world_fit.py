"""Which numbers of processes a recipe's parallel layout fits, and what to tell a user
whose launch does not fit (``phoenix train``, ``--dry-run`` and ``phoenix describe``)."""

from __future__ import annotations

import math
import shlex


def smallest_world(parallel) -> int:
    """The fewest processes the layout runs on: PP x a multiple of TP x CP that EP x ETP
    divides (megatron's rule: ETP x EP divides world / PP)."""
    p = parallel
    return p.pipeline * math.lcm(p.tensor * p.context, p.expert * (p.expert_tensor or p.tensor))


def fits(parallel, world: int) -> bool:
    return world % smallest_world(parallel) == 0


def layout_hint(cfg, world: int, config: str, overrides: list[str]) -> str:
    """How to run ``config`` when ``world`` processes do not fit its layout: the torchrun
    line of the smallest world that fits, or the overrides that fit ``world``."""
    p, need = cfg.parallel, smallest_world(cfg.parallel)
    args = " ".join(shlex.quote(a) for a in [config, *overrides])
    launch = (f"launch {need} processes (phoenix torchrun --standalone --nproc_per_node {need} "
              f"-m phoenix.train {args})")
    degrees = {"tensor": p.tensor, "pipeline": p.pipeline, "context": p.context,
               "expert": p.expert}
    if world == 1:
        ones = " ".join(f"parallel.{k}=1" for k, v in degrees.items() if v > 1)
        return f"{launch}, or run on one process with {ones}"
    return launch
