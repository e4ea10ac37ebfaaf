"""A rank's model chunks: the ``GPTModel`` inside the wrappers training puts around it."""

from __future__ import annotations

import torch


def unwrap(chunk: torch.nn.Module) -> torch.nn.Module:
    """The ``GPTModel`` of a model chunk: megatron's ``DistributedDataParallel`` and
    ``Float16Module`` both keep the model they wrap in ``.module``, followed to the end (a
    bare ``GPTModel`` is returned as it is)."""
    while isinstance(getattr(chunk, "module", None), torch.nn.Module):
        chunk = chunk.module
    return chunk
