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
