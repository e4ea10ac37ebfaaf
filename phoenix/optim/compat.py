"""A fix for megatron-core 0.16.1's distributed optimizer with torch's Adam.

Without apex or Transformer Engine (always the case on CPU) megatron-core falls back to
``torch.optim.Adam``, whose per-parameter state has a ``step`` entry. Loading a
``fully_reshardable`` distributed-optimizer checkpoint then copies every state key of
the parameter from the checkpoint's tensors, which carry no ``step`` (megatron restores
it separately, just before), and fails with ``KeyError: 'step'``. The patched method
copies the keys the checkpoint provides and leaves ``step`` as megatron already set it.

Second, the same load path hands one shared ``step`` tensor to every parameter's state;
torch's Adam increments each parameter's ``step`` in place, so after a resume the
shared counter advanced once per parameter per step and the bias correction drifted
(losses diverged from an uninterrupted run from the second resumed step). The patched
``load_state_dict`` gives each parameter its own copy.

Both are applied only when megatron itself reports neither apex nor TE.

Third, whatever the stack (:func:`patch_fully_reshardable_multi_bucket`): saving a
``fully_reshardable`` optimizer state of a gradient buffer split into several buckets
(``parallel.overlap_grad_reduce``, the CUDA default with DP > 1) writes every parameter
past the first bucket from the wrong offset. ``get_parameter_state_dp_zero`` joins the
buckets with each bucket's end padding stripped, and
``sharded_param_state_fully_reshardable`` slices that by the parameters' offsets in the
padded buffer. The patch hands it the state laid out as the padded buffer (zeros in each
bucket's padding), so the offsets are right. Found here as a resume whose loss left the
uninterrupted run's at its first step (``tests/checkpoint/test_multi_bucket_resume.py``);
the same fault is described in Megatron-LM pull request #5077.
"""

from __future__ import annotations

import torch

_PATCHED = False


def patch_distributed_optimizer_for_torch_adam() -> None:
    global _PATCHED
    from megatron.core.optimizer import distrib_optimizer as d

    if _PATCHED or getattr(d, "HAVE_APEX_OR_TE", True):
        return
    original = d.DistributedOptimizer._set_main_param_and_optimizer_states

    def _set_main_param_and_optimizer_states(self, model_param, tensors):
        if self.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8:
            return original(self, model_param, tensors)
        group_index, group_order = self.model_param_group_index_map[model_param]
        main_param = self.optimizer.param_groups[group_index]["params"][group_order]
        dst = {"param": main_param, **self.optimizer.state[main_param]}
        for key, value in tensors.items():
            # dp_reshardable hands over its bucket-layout flag ``padding`` and this
            # optimizer's own ``step`` (not saved: megatron restored it from the param groups)
            if key not in ("padding", "step"):
                dst[key].copy_(value)

    original_load = d.DistributedOptimizer.load_state_dict

    def load_state_dict(self, state_dict):
        original_load(self, state_dict)
        for state in self.optimizer.state.values():
            if torch.is_tensor(state.get("step")):
                state["step"] = state["step"].clone()

    d.DistributedOptimizer._set_main_param_and_optimizer_states = _set_main_param_and_optimizer_states
    d.DistributedOptimizer.load_state_dict = load_state_dict
    _PATCHED = True


_PATCHED_BUCKETS = False


def _as_padded_buffer(optimizer, state):
    """``get_parameter_state_dp_zero``'s world tensors (buckets joined without their end
    padding) re-laid in the padded buffer's coordinates, where ``param_index_map`` points."""
    if state is None:
        return None
    for gbuf_idx, by_dtype in state.items():
        if not isinstance(gbuf_idx, int):
            continue
        buffer = optimizer.buffers[gbuf_idx]
        for world in by_dtype.values():
            for key, tensor in list(world.items()):
                if not torch.is_tensor(tensor) or tensor.dim() != 1 or key == "step":
                    continue
                padded = tensor.new_zeros(buffer.numel)
                joined = 0
                for bucket in buffer.buckets:
                    n = bucket.numel_unpadded
                    padded[bucket.offset:bucket.offset + n] = tensor[joined:joined + n]
                    joined += n
                world[key] = padded
    return state


def patch_fully_reshardable_multi_bucket() -> None:
    """Make megatron-core 0.16.1's ``fully_reshardable`` optimizer save correct for
    gradient buffers of several buckets (see the module docstring). Idempotent."""
    global _PATCHED_BUCKETS
    from megatron.core.optimizer import distrib_optimizer as d

    if _PATCHED_BUCKETS:
        return
    original = d.DistributedOptimizer.sharded_param_state_fully_reshardable

    def sharded_param_state_fully_reshardable(self, *args, **kwargs):
        dp_zero = self.get_parameter_state_dp_zero
        self.get_parameter_state_dp_zero = lambda **kw: _as_padded_buffer(self, dp_zero(**kw))
        try:
            return original(self, *args, **kwargs)
        finally:
            del self.get_parameter_state_dp_zero

    d.DistributedOptimizer.sharded_param_state_fully_reshardable = sharded_param_state_fully_reshardable
    _PATCHED_BUCKETS = True
