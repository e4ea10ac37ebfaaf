"""The tensor map between Hugging Face Llama/Qwen2/Mistral (and the attention, norms and
dense MLPs of Mixtral/Qwen2-MoE, whose MoE MLPs map by :mod:`phoenix.convert.hf_moe`) and
megatron-core's GPTModel (local layer spec, TP = PP = EP = 1), one decoder layer at a time.

===========================================  ============================================
HF (``model.layers.i.`` ...)                 megatron-core (``decoder.layers.i.`` ...)
===========================================  ============================================
``input_layernorm.weight``                   ``input_layernorm.weight``
``post_attention_layernorm.weight``          ``pre_mlp_layernorm.weight``
``self_attn.{q,k,v}_proj.{weight,bias}``     ``self_attention.linear_qkv.{weight,bias}``
``self_attn.o_proj.weight``                  ``self_attention.linear_proj.weight``
``mlp.gate_proj.weight``, ``mlp.up_proj``    ``mlp.linear_fc1.weight`` = ``[gate; up]``
``mlp.down_proj.weight``                     ``mlp.linear_fc2.weight``
``model.embed_tokens.weight``                ``embedding.word_embeddings.weight`` (padded)
``model.norm.weight``                        ``decoder.final_layernorm.weight``
``lm_head.weight`` (absent when tied)        ``output_layer.weight`` (padded; absent when tied)
===========================================  ============================================

``linear_qkv`` is interleaved per query group (GQA): for each group ``g``, its
``heads / groups`` query heads, then key head ``g``, then value head ``g`` (rows of
``head_dim`` each). A plain ``cat(q, k, v)`` is the classic conversion bug: it only shows
with GQA. Padded vocabulary rows are zero on import and cut on export.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from phoenix.convert.hf_moe import MoEShape, moe_mlp_names, moe_mlp_to_hf, moe_mlp_to_megatron

EMBED, FINAL_NORM, LM_HEAD = "model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"
M_EMBED, M_FINAL_NORM, M_OUTPUT = ("embedding.word_embeddings.weight",
                                   "decoder.final_layernorm.weight", "output_layer.weight")


@dataclass(frozen=True)
class Shape:
    """What the name map needs of the model."""

    num_layers: int
    hidden: int
    heads: int
    groups: int
    qkv_bias: bool
    tied: bool
    moe: Optional[MoEShape] = None
    """Mixtral / Qwen2-MoE: the MLP of its MoE layers maps by :mod:`phoenix.convert.hf_moe`."""

    def is_moe(self, i: int) -> bool:
        return self.moe is not None and i in self.moe.layers

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads


def hf_layer_names(i: int, shape: Shape) -> list[str]:
    """The HF tensors of decoder layer ``i``."""
    p = f"model.layers.{i}."
    names = [p + "input_layernorm.weight", p + "post_attention_layernorm.weight",
             p + "self_attn.q_proj.weight", p + "self_attn.k_proj.weight",
             p + "self_attn.v_proj.weight", p + "self_attn.o_proj.weight"]
    if shape.is_moe(i):
        names += moe_mlp_names(i, shape.moe)
    else:
        names += [p + "mlp.gate_proj.weight", p + "mlp.up_proj.weight", p + "mlp.down_proj.weight"]
    if shape.qkv_bias:
        names += [p + f"self_attn.{x}_proj.bias" for x in "qkv"]
    return names


def hf_global_names(shape: Shape) -> list[str]:
    return [EMBED, FINAL_NORM] + ([] if shape.tied else [LM_HEAD])


def interleave_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, shape: Shape) -> torch.Tensor:
    """HF q/k/v (rows: heads x head_dim) -> megatron's per-group ``[q_g..., k_g, v_g]``."""
    g, per, d = shape.groups, shape.heads // shape.groups, shape.head_dim
    rest = q.shape[1:]
    qkv = torch.cat([q.reshape(g, per * d, *rest), k.reshape(g, d, *rest),
                     v.reshape(g, d, *rest)], dim=1)
    return qkv.reshape(g * (per + 2) * d, *rest)


def split_qkv(qkv: torch.Tensor, shape: Shape) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverse of :func:`interleave_qkv`."""
    g, per, d = shape.groups, shape.heads // shape.groups, shape.head_dim
    rest = qkv.shape[1:]
    grouped = qkv.reshape(g, (per + 2) * d, *rest)
    q, k, v = grouped.split([per * d, d, d], dim=1)
    return (q.reshape(g * per * d, *rest).contiguous(), k.reshape(g * d, *rest).contiguous(),
            v.reshape(g * d, *rest).contiguous())


def layer_to_megatron(i: int, hf: dict[str, torch.Tensor], shape: Shape) -> dict[str, torch.Tensor]:
    """Megatron tensors of decoder layer ``i`` from its HF tensors (``hf_layer_names``)."""
    p, m = f"model.layers.{i}.", f"decoder.layers.{i}."
    a = p + "self_attn."
    out = {
        m + "input_layernorm.weight": hf[p + "input_layernorm.weight"],
        m + "pre_mlp_layernorm.weight": hf[p + "post_attention_layernorm.weight"],
        m + "self_attention.linear_qkv.weight": interleave_qkv(
            hf[a + "q_proj.weight"], hf[a + "k_proj.weight"], hf[a + "v_proj.weight"], shape),
        m + "self_attention.linear_proj.weight": hf[a + "o_proj.weight"],
    }
    if shape.is_moe(i):
        out.update(moe_mlp_to_megatron(i, hf, shape.moe))
    else:
        out[m + "mlp.linear_fc1.weight"] = torch.cat([hf[p + "mlp.gate_proj.weight"],
                                                      hf[p + "mlp.up_proj.weight"]])
        out[m + "mlp.linear_fc2.weight"] = hf[p + "mlp.down_proj.weight"]
    if shape.qkv_bias:
        out[m + "self_attention.linear_qkv.bias"] = interleave_qkv(
            hf[a + "q_proj.bias"], hf[a + "k_proj.bias"], hf[a + "v_proj.bias"], shape)
    return out


def layer_to_hf(i: int, mg: dict[str, torch.Tensor], shape: Shape) -> dict[str, torch.Tensor]:
    """HF tensors of decoder layer ``i`` from its megatron tensors (inverse of
    :func:`layer_to_megatron`)."""
    p, m = f"model.layers.{i}.", f"decoder.layers.{i}."
    a = p + "self_attn."
    q, k, v = split_qkv(mg[m + "self_attention.linear_qkv.weight"], shape)
    out = {
        p + "input_layernorm.weight": mg[m + "input_layernorm.weight"],
        p + "post_attention_layernorm.weight": mg[m + "pre_mlp_layernorm.weight"],
        a + "q_proj.weight": q, a + "k_proj.weight": k, a + "v_proj.weight": v,
        a + "o_proj.weight": mg[m + "self_attention.linear_proj.weight"],
    }
    if shape.is_moe(i):
        out.update(moe_mlp_to_hf(i, mg, shape.moe))
    else:
        gate, up = mg[m + "mlp.linear_fc1.weight"].chunk(2)
        out[p + "mlp.gate_proj.weight"] = gate.contiguous()
        out[p + "mlp.up_proj.weight"] = up.contiguous()
        out[p + "mlp.down_proj.weight"] = mg[m + "mlp.linear_fc2.weight"]
    if shape.qkv_bias:
        out[a + "q_proj.bias"], out[a + "k_proj.bias"], out[a + "v_proj.bias"] = split_qkv(
            mg[m + "self_attention.linear_qkv.bias"], shape)
    return out


def pad_rows(weight: torch.Tensor, rows: int) -> torch.Tensor:
    """``weight`` with zero rows appended up to ``rows`` (the padded vocabulary)."""
    if weight.shape[0] > rows:
        raise ValueError(f"{weight.shape[0]} vocabulary rows exceed the padded size {rows}")
    out = weight.new_zeros((rows, *weight.shape[1:]))
    out[: weight.shape[0]] = weight
    return out
