"""Rewrite a ``dp_reshardable`` checkpoint as ``fully_reshardable`` (``phoenix reshard``).

A dp_reshardable checkpoint (phoenix.checkpoint.optimizer_format) holds the optimizer state
in the saving run's gradient-bucket layout: it loads at any data-parallel size, but not at
another TP/PP/CP/EP. :func:`reshard` loads it at its own degrees, with the fewest processes
those degrees allow (:func:`reshard_world_size`: one data-parallel replica), and writes the
same step with the state gathered per parameter, which loads at any layout. The output is a
run's ``checkpoints/`` folder (``OUT/checkpoints/step_N`` + ``latest``), written to a
temporary name and renamed into place like any save; ``OUT`` may be the source run itself
(the checkpoint is then replaced by its converted copy once that is complete).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

from phoenix.checkpoint.optimizer_format import DP_RESHARDABLE, FULLY_RESHARDABLE, saved_format
from phoenix.checkpoint.store import (
    CheckpointError,
    CheckpointStore,
    checkpoint_root,
    read_checkpoint_state,
    resolve_checkpoint,
    step_of,
)
from phoenix.checkpoint.trained_model import trained_stage

_LAYOUT_KEYS = ("optimizer_format", "optimizer_layout", "world_size", "has_optimizer")


def reshard_world_size(parallel) -> int:
    """The fewest ranks that hold ``parallel``'s degrees (one data-parallel replica of the
    dense layers; the expert layers need ``expert * expert_tensor`` ranks per stage)."""
    dense = parallel.tensor * parallel.context
    experts = parallel.expert * (parallel.expert_tensor or parallel.tensor)
    return parallel.pipeline * math.lcm(dense, experts)


def source_of(src: str | os.PathLike) -> tuple[Path, dict]:
    """The checkpoint ``src`` names (a step folder, or a run / checkpoints folder: its
    latest) and its state bundle. Raises CheckpointError when it needs no conversion."""
    path = resolve_checkpoint(src)
    bundle = read_checkpoint_state(path)
    if saved_format(bundle) != DP_RESHARDABLE or not bundle.get("has_optimizer", True):
        raise CheckpointError(f"checkpoint {path} needs no resharding: its optimizer state is "
                              f"{saved_format(bundle) if bundle.get('has_optimizer', True) else 'absent'}"
                              f", which loads at any layout")
    return path, bundle


def reshard(src: str | os.PathLike, out: str | os.PathLike) -> Path:
    """Convert checkpoint ``src`` (see :func:`source_of`) into ``OUT/checkpoints``; returns
    the written checkpoint. Collective: every rank of a world of
    :func:`reshard_world_size` ranks calls it (torch.distributed started by the caller or
    from torchrun's environment)."""
    from phoenix.config.loader import load_saved_config
    from phoenix.model import build_model
    from phoenix.optim.builder import build_optimizer
    from phoenix.runtime import init_runtime
    from phoenix.tokenizer import model_vocab_size

    path, bundle = source_of(src)
    cfg = load_saved_config(path / "config.yaml")
    layout = init_runtime(cfg)
    step = step_of(path)
    model = build_model(cfg, layout, model_vocab_size(cfg), initialize=False,
                        rope=trained_stage(cfg, step).rope)
    optimizer = build_optimizer(cfg, model, layout, param_rules=cfg.optim.param_groups,
                                freeze=cfg.optim.freeze)
    source = CheckpointStore(path.parent, layout.rank, layout.world_size)
    source.check_compatible(path, model)
    source.load(path, model, optimizer, bundle)
    kept = {k: v for k, v in bundle.items() if k not in _LAYOUT_KEYS}
    target = CheckpointStore(checkpoint_root(out), layout.rank, layout.world_size)
    return target.save(step, model, optimizer, kept, (path / "config.yaml").read_text(),
                       optimizer_format=FULLY_RESHARDABLE)
