"""Core attention with ``torch.nn.functional.scaled_dot_product_attention`` (SDPA).

``model.attention_backend: sdpa`` puts :class:`SDPAttention` in the layer spec's
``core_attention`` slot (:func:`sdpa_spec`), in place of megatron-core's unfused
``DotProductAttention`` (local spec) or TE's ``TEDotProductAttention``. It keeps megatron's
contract (megatron/core/transformer/dot_product_attention.py, megatron-core 0.16.1):

* constructed with ``(config, layer_number, attn_mask_type, attention_type,
  attention_dropout, softmax_scale, cp_comm_type, pg_collection)``;
* ``forward(query, key, value, attention_mask, attn_mask_type, attention_bias,
  packed_seq_params)`` with query ``[sq, b, np, hn]`` and key/value ``[sk, b, ng, hn]``
  (this TP rank's heads: np = heads / TP, ng = query groups / TP);
* returns the context ``[sq, b, np * hn]``;
* ``softmax_scale``: the one given (megatron's Attention passes ``config.softmax_scale``),
  else ``1 / sqrt(hn)``. YaRN's attention factor is applied to q and k by megatron's
  Attention (cos/sin times mscale) before core attention, so it reaches SDPA unchanged;
* ``attention_mask``: bool, True = masked (megatron's convention, e.g. phoenix's dense
  causal block-diagonal document mask); given, it replaces the causal mask, as in
  megatron's unfused softmax, and goes to SDPA as one additive float mask shared by all
  layers (:func:`additive_mask`). Without one, a causal mask type means ``is_causal``;
* attention dropout under the model-parallel RNG tracker (as megatron: forked unless
  sequence parallel), so TP ranks draw independent masks.

On CUDA, SDPA picks FlashAttention (causal, no mask) or the memory-efficient kernel (a
mask), neither of which keeps the ``s x s`` probabilities for the backward. torch's GQA
(``enable_gqa``) runs only in the flash and math kernels, so with a mask and GQA the keys
and values are repeated to the query heads first (``b·s·np·hn`` each, far below the
``s^2`` the math kernel would keep). Refused, with a message: context parallelism, packed
THD sequences (TE spec with ``data.document_mask``), attention bias, sliding windows and
softmax variants other than vanilla; phoenix.runtime.capabilities refuses the configs
that would reach them, before any work.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from typing import Optional

import torch
import torch.nn.functional as F

from megatron.core import tensor_parallel
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule


class SDPAttention(MegatronModule):
    """megatron's core-attention interface over ``F.scaled_dot_product_attention``."""

    def __init__(self, config, layer_number: int, attn_mask_type: AttnMaskType,
                 attention_type: str, attention_dropout: Optional[float] = None,
                 softmax_scale: Optional[float] = None, cp_comm_type: Optional[str] = None,
                 pg_collection=None):
        super().__init__(config=config)
        refuse = _unsupported(config)
        if refuse:
            raise ValueError(f"model.attention_backend: sdpa does not support {refuse}; use "
                             f"attention_backend te (Transformer Engine) or unfused")
        self.layer_number = max(1, layer_number)
        self.attn_mask_type = attn_mask_type
        self.attention_type = attention_type
        self.dropout_p = (config.attention_dropout if attention_dropout is None
                          else attention_dropout)
        # megatron's Attention passes config.softmax_scale; None is 1/sqrt(head dim) there too.
        # apply_query_key_layer_scaling divides the scale by the layer number and multiplies
        # it back inside megatron's fp32 softmax: the product is this scale.
        self.softmax_scale = (softmax_scale if softmax_scale is not None
                              else 1.0 / math.sqrt(config.kv_channels))
        if pg_collection is not None:
            self.tp_group = pg_collection.tp

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                attention_mask: Optional[torch.Tensor],
                attn_mask_type: Optional[AttnMaskType] = None,
                attention_bias: Optional[torch.Tensor] = None,
                packed_seq_params=None) -> torch.Tensor:
        if packed_seq_params is not None:
            raise NotImplementedError(
                "model.attention_backend: sdpa cannot read packed THD sequences (Transformer "
                "Engine spec with data.document_mask); use attention_backend te")
        if attention_bias is not None:
            raise NotImplementedError("model.attention_backend: sdpa has no attention bias")
        mask_type = self.attn_mask_type if attn_mask_type is None else attn_mask_type
        sq, b, n_heads, head_dim = query.shape
        n_groups = key.shape[2]
        # [s, b, heads, hn] -> [b, heads, s, hn] (views: the head dim stays contiguous)
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        attn_mask, is_causal, gqa = None, False, n_heads != n_groups
        if attention_mask is not None:
            attn_mask = additive_mask(attention_mask, q.dtype)
            if gqa:  # the masked kernels have no GQA: repeat k/v as megatron's unfused does
                k = k.repeat_interleave(n_heads // n_groups, dim=1)
                v = v.repeat_interleave(n_heads // n_groups, dim=1)
                gqa = False
        elif mask_type == AttnMaskType.causal:
            if key.shape[0] != sq:  # SDPA would align the causal mask top-left
                raise NotImplementedError(
                    f"model.attention_backend: sdpa has no causal attention of {sq} queries "
                    f"over {key.shape[0]} keys (a KV cache); use unfused or te")
            is_causal = True
        elif mask_type != AttnMaskType.no_mask:
            raise NotImplementedError(f"model.attention_backend: sdpa needs an attention mask "
                                      f"for mask type {mask_type.name}")
        dropout_p = self.dropout_p if self.training else 0.0
        kwargs = dict(attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                      scale=self.softmax_scale, enable_gqa=gqa)
        if dropout_p > 0 and not self.config.sequence_parallel:
            with tensor_parallel.get_cuda_rng_tracker().fork():
                context = F.scaled_dot_product_attention(q, k, v, **kwargs)
        else:
            context = F.scaled_dot_product_attention(q, k, v, **kwargs)
        # [b, np, sq, hn] -> [sq, b, np * hn]
        return context.permute(2, 0, 1, 3).reshape(sq, b, n_heads * head_dim)


def additive_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """megatron's bool mask (True = masked) as the additive float mask SDPA would make of
    it (0 = attend, -inf = masked), made once per mask and shared by every layer: SDPA's own
    conversion would make, and keep for the backward, one ``2·s²·b``-byte copy per layer."""
    bias = getattr(mask, "_phoenix_sdpa_bias", None)
    if bias is None or bias.dtype != dtype:
        bias = torch.zeros(mask.shape, dtype=dtype, device=mask.device)
        bias.masked_fill_(mask, float("-inf"))
        mask._phoenix_sdpa_bias = bias
    return bias


def _unsupported(config) -> Optional[str]:
    """What in ``config`` SDPAttention cannot compute (None: everything is supported)."""
    if config.context_parallel_size > 1:
        return f"context parallelism (parallel.context={config.context_parallel_size})"
    if getattr(config, "softmax_type", "vanilla") != "vanilla":
        return f"softmax_type {config.softmax_type!r}"
    if getattr(config, "window_size", None) is not None:
        return "sliding-window attention"
    return None


def sdpa_spec(spec):
    """A copy of ``spec`` (a layer ModuleSpec or a TransformerBlockSubmodules, local or TE)
    whose self-attention uses :class:`SDPAttention` as its core attention."""
    spec = copy.deepcopy(spec)
    _replace_core_attention(spec)
    return spec


def _replace_core_attention(node) -> None:
    if not dataclasses.is_dataclass(node) or isinstance(node, type):
        return
    for f in dataclasses.fields(node):
        value = getattr(node, f.name)
        if f.name == "core_attention":
            setattr(node, f.name, SDPAttention)
        elif isinstance(value, (list, tuple)):
            for item in value:
                _replace_core_attention(item)
        else:
            _replace_core_attention(value)
