"""A checkpoint's model as it was trained: its weights, built with the RoPE they were
last trained with.

RoPE frequencies are not stored in a checkpoint (they are not parameters). The RoPE of
the weights at step ``s`` is that of the stage of their last step, ``s - 1``: a
context-extension stage's own ``rope``, else ``model.rope``. :func:`trained_stage` is
the one place that derives it; evaluation, export and the test support load a model
through :func:`load_model`.
"""

from __future__ import annotations

import os
from typing import Optional

import torch

from phoenix.checkpoint.store import CheckpointStore, resolve_checkpoint, step_of
from phoenix.config import ResolvedStage, RunConfig


def trained_stage(cfg: RunConfig, step: int) -> ResolvedStage:
    """The stage of ``cfg`` that trained the last step of a checkpoint taken at ``step``
    (the first stage at step 0; the last stage past the end): its ``rope`` and
    ``seq_length`` are what the weights were trained with."""
    return cfg.resolved.stages.stage_at(max(step - 1, 0))


def load_model(checkpoint: str | os.PathLike, cfg: RunConfig, layout, *,
               vocab_size: Optional[int] = None, dtype: Optional[torch.dtype] = None,
               initialize: bool = True) -> list:
    """This rank's model chunks of ``cfg`` at ``layout`` (a list, not wrapped in DDP) with
    the weights of ``checkpoint`` (a ``step_*`` folder, or a run / checkpoints folder whose
    latest is taken; it reshards to ``layout``) and the RoPE of :func:`trained_stage`.

    ``vocab_size``: default ``model.vocab_size``, else the tokenizer's. ``dtype`` and
    ``initialize`` as in :func:`phoenix.model.build_model` (``initialize=False`` skips
    the random initialisation every loaded weight overwrites). The model's shapes are
    checked against the checkpoint first: CheckpointError listing each differing weight.
    Collective over the layout's ranks."""
    from phoenix.model import build_model
    from phoenix.tokenizer import model_vocab_size

    path = resolve_checkpoint(checkpoint)
    rope = trained_stage(cfg, step_of(path)).rope
    model = build_model(cfg, layout, vocab_size if vocab_size is not None else model_vocab_size(cfg),
                        wrap_ddp=False, initialize=initialize, dtype=dtype, rope=rope)
    store = CheckpointStore(path.parent, layout.rank, layout.world_size)
    store.check_compatible(path, model)
    store.load_weights(path, model)
    return model
