"""Complete parameters under the overlapped parameter all-gather.

With ``parallel.overlap_param_gather`` (megatron's DDP ``overlap_param_gather``) the
distributed optimizer updates only this rank's shard; the other shards arrive bucket by
bucket during the next forward, through forward pre-hooks. Anything that reads the weights
between an optimizer step and the next forward (a checkpoint save, eval, a conversion)
must first finish that gather, as Megatron-LM does around its saves and evals.
"""

from __future__ import annotations

import contextlib


def _hooked(model_chunks) -> list:
    return [chunk for chunk in model_chunks
            if getattr(chunk, "use_forward_hook", False) and chunk.remove_forward_pre_hook_handles]


@contextlib.contextmanager
def gathered_params(model_chunks):
    """Inside the block every rank's weights are the updated ones: the pending parameter
    all-gather is completed synchronously and the forward pre-hooks are off; they are back
    afterwards. Collective over the data-parallel group under overlap_param_gather; a
    no-op otherwise."""
    hooked = _hooked(model_chunks)
    for chunk in hooked:
        chunk.disable_forward_pre_hook(param_sync=True)
    try:
        yield
    finally:
        for chunk in hooked:
            chunk.enable_forward_pre_hook()
