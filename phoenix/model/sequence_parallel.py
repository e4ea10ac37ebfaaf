"""Sequence parallelism on megatron-core's local layer spec (no Transformer Engine).

The local spec builds its norms with ``WrappedTorchNorm`` (torch LayerNorm/RMSNorm),
which asserts ``not sequence_parallel``: under sequence parallelism each TP rank
normalises a different slice of the sequence, so the norm weights' gradients are partial
and must be summed over TP. megatron does that in ``finalize_model_grads`` for every
parameter marked ``sequence_parallel`` (TE's and apex's norms mark theirs).
:class:`SequenceParallelNorm` is the same torch norm with that mark, and
:func:`sequence_parallel_spec` puts it in place of ``WrappedTorchNorm`` in a spec. MoE
with TP > 1 needs this: megatron-core trains MoE layers under TP only with sequence
parallelism.
"""

from __future__ import annotations

import copy
import dataclasses

import torch


class SequenceParallelNorm:
    """``WrappedTorchNorm``'s torch LayerNorm/RMSNorm, its weights marked
    ``sequence_parallel`` so their gradients are summed over TP."""

    def __new__(cls, config, hidden_size: int, eps: float = 1e-5, **_unused):
        if config.normalization == "LayerNorm":
            norm = torch.nn.LayerNorm(normalized_shape=hidden_size, eps=eps)
        elif config.normalization == "RMSNorm":
            norm = torch.nn.RMSNorm(normalized_shape=hidden_size, eps=eps)
        else:
            raise ValueError(f"SequenceParallelNorm: unsupported normalization "
                             f"{config.normalization!r}")
        for param in norm.parameters():
            param.sequence_parallel = config.sequence_parallel
        return norm


def _replace_norms(node, old):
    """Replace the class ``old`` by SequenceParallelNorm in a spec tree, in place."""
    if not dataclasses.is_dataclass(node) or isinstance(node, type):
        return
    for f in dataclasses.fields(node):
        value = getattr(node, f.name)
        if value is old:
            setattr(node, f.name, SequenceParallelNorm)
        elif isinstance(value, (list, tuple)):
            for item in value:
                _replace_norms(item, old)
        else:
            _replace_norms(value, old)


def sequence_parallel_spec(spec, config, pp_rank: int, vp_stage: int | None = None):
    """A copy of ``spec`` (a layer ModuleSpec or a TransformerBlockSubmodules) as a block
    spec whose torch norms (final norm included) support sequence parallelism.
    ``vp_stage``: the model chunk (parallel.virtual_pipeline), None without one."""
    from megatron.core.transformer.spec_utils import ModuleSpec
    from megatron.core.transformer.torch_norm import WrappedTorchNorm
    from megatron.core.transformer.transformer_block import (
        TransformerBlockSubmodules,
        get_num_layers_to_build,
    )

    if isinstance(spec, ModuleSpec):  # one layer spec: the block megatron would build
        n = get_num_layers_to_build(config, vp_stage=vp_stage, pp_rank=pp_rank)
        spec = TransformerBlockSubmodules(layer_specs=[spec] * n, layer_norm=WrappedTorchNorm)
    spec = copy.deepcopy(spec)
    _replace_norms(spec, WrappedTorchNorm)
    return spec
