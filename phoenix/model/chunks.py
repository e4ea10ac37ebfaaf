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


def chunk_iterators(micro_batches: list, num_chunks: int):
    """The ``data_iterator`` of megatron's ``forward_backward_func`` for a rank with
    ``num_chunks`` model chunks: one iterator over ``micro_batches`` (one chunk), or one
    per chunk (a virtual pipeline: every chunk runs every micro-batch, the first chunk
    reading its tokens and the last its labels), as Megatron-LM's training loop builds
    them."""
    if num_chunks == 1:
        return iter(micro_batches)
    return [iter(micro_batches) for _ in range(num_chunks)]
