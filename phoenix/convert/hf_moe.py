"""Mixture-of-experts models: Mixtral and Qwen2-MoE config keys <-> ``model.moe``, and the
tensor map of their MoE layers' MLP (the attention and norms are the dense map's).

Config (``config.json`` -> ``model.moe``):

=================================================  ==========================================
``num_local_experts`` (Mixtral), ``num_experts``   ``num_experts``
``num_experts_per_tok``                            ``router_topk``
``moe_intermediate_size`` (Qwen2-MoE)              ``ffn_hidden_size`` (Mixtral: the dense
                                                   ``intermediate_size``, every layer is MoE)
``shared_expert_intermediate_size`` (Qwen2-MoE)    ``shared_expert_intermediate_size``,
                                                   ``shared_expert_gate: true``
``norm_topk_prob`` (Qwen2-MoE; Mixtral: true)      ``router_pre_softmax = not norm_topk_prob``
``decoder_sparse_step``, ``mlp_only_layers``       ``layer_freq`` (a 0/1 list; 1 = MoE)
``router_aux_loss_coef``                           ``aux_loss_coeff`` (same number, see below)
``router_jitter_noise`` (Mixtral)                  refused unless 0
``output_router_logits``                           ignored (an inference output switch)
=================================================  ==========================================

Routing is softmax over all E logits, then the top k: renormalised over the k (Mixtral,
Qwen2-MoE with ``norm_topk_prob``) is megatron's softmax over the k selected logits
(``router_pre_softmax=false``, the same numbers); not renormalised is
``router_pre_softmax=true``. Imports are dropless (``capacity_factor`` None) with an fp32
router, as transformers routes.

The aux-loss coefficient is copied as is, but the two losses are not the same quantity:
megatron adds ``coeff * E/(k T^2) * sum_e tokens_e * probs_e`` *per MoE layer* (a sum
over layers), transformers adds ``coef * E * sum_e f_e P_e`` once, on the router logits
of all layers concatenated, and only with ``output_router_logits``. Per layer the
transformers term is k times megatron's, so with L MoE layers the coefficient giving the
same balancing pressure is about ``coef * k / L``; it is a training hyper-parameter, not
part of the forward pass, so it is not rescaled.

Tensors of MoE layer ``i`` (``model.layers.i.`` / ``decoder.layers.i.mlp.``):

======================================================  =====================================
Mixtral ``block_sparse_moe.gate.weight``                ``router.weight`` [E, h]
Mixtral ``block_sparse_moe.experts.e.w1`` / ``w3``      ``experts.local_experts.e.linear_fc1``
                                                        = ``[w1; w3]`` (gate; up)
Mixtral ``block_sparse_moe.experts.e.w2``               ``experts.local_experts.e.linear_fc2``
Qwen2-MoE ``mlp.gate.weight``                           ``router.weight``
Qwen2-MoE ``mlp.experts.e.{gate,up,down}_proj``         ``experts.local_experts.e.linear_fc1``
                                                        = ``[gate; up]``, ``linear_fc2``
Qwen2-MoE ``mlp.shared_expert.{gate,up,down}_proj``     ``shared_experts.linear_fc1`` /
                                                        ``linear_fc2``
Qwen2-MoE ``mlp.shared_expert_gate.weight`` [1, h]      ``shared_experts.gate_weight``
======================================================  =====================================

These are the on-disk names transformers 5 writes (it fuses the experts in memory but saves
and loads the per-expert names). Experts are converted at EP = 1 (global expert ids);
dist_checkpointing reshards them to any ``parallel.expert`` on load.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from phoenix.convert.common import ConversionError

MOE_ARCHITECTURES = {"MixtralForCausalLM": "mixtral", "Qwen2MoeForCausalLM": "qwen2_moe"}
# config.json keys each MoE architecture adds to the dense ones (mapped or checked below).
MOE_KEYS = {
    "mixtral": {"num_local_experts", "num_experts_per_tok", "router_aux_loss_coef",
                "router_jitter_noise", "output_router_logits"},
    "qwen2_moe": {"num_experts", "num_experts_per_tok", "moe_intermediate_size",
                  "shared_expert_intermediate_size", "norm_topk_prob", "router_aux_loss_coef",
                  "output_router_logits", "decoder_sparse_step", "mlp_only_layers", "qkv_bias"},
}


def _int(hf: dict, key: str, default=None) -> int:
    value = hf.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConversionError(f"config.json {key}={value!r}: must be an integer >= 1")
    return value


def qwen2_moe_layers(hf: dict) -> list[int]:
    """Qwen2-MoE's 0/1 pattern (1 = MoE), transformers' rule: layer ``i`` is MoE when it is
    not in ``mlp_only_layers`` and ``(i + 1) % decoder_sparse_step == 0``."""
    n = int(hf["num_hidden_layers"])
    step = _int(hf, "decoder_sparse_step", 1)
    dense = hf.get("mlp_only_layers") or []
    if not isinstance(dense, list) or any(not isinstance(i, int) or not 0 <= i < n for i in dense):
        raise ConversionError(f"config.json mlp_only_layers={dense!r}: must list layer indices "
                              f"in [0, {n})")
    return [int(i not in dense and (i + 1) % step == 0) for i in range(n)]


def moe_from_hf(hf: dict, arch: str) -> dict:
    """The ``model.moe`` section of a Mixtral / Qwen2-MoE config.json (plain data)."""
    if arch == "mixtral":
        if hf.get("router_jitter_noise", 0.0) not in (0, 0.0, None):
            raise ConversionError(f"config.json router_jitter_noise={hf['router_jitter_noise']!r}: "
                                  f"not supported (megatron-core's router has no input jitter; "
                                  f"set it to 0.0)")
        experts, renormalise, layers = _int(hf, "num_local_experts"), True, None
        ffn, shared = None, None
    else:
        experts, renormalise = _int(hf, "num_experts"), bool(hf.get("norm_topk_prob", False))
        layers = qwen2_moe_layers(hf)
        if 1 not in layers:
            raise ConversionError("config.json decoder_sparse_step/mlp_only_layers: no layer is "
                                  "MoE (convert it as a dense Qwen2 model)")
        ffn = _int(hf, "moe_intermediate_size")
        shared = _int(hf, "shared_expert_intermediate_size")
    topk = _int(hf, "num_experts_per_tok", 2)
    if topk > experts:
        raise ConversionError(f"config.json num_experts_per_tok={topk}: more than the {experts} "
                              f"experts")
    if topk == 1 and renormalise:
        raise ConversionError("config.json num_experts_per_tok=1 with renormalised top-k "
                              "(Mixtral, norm_topk_prob=true): every weight is 1, which "
                              "megatron-core's softmax router cannot express")
    moe = {"num_experts": experts, "router_topk": topk, "router_pre_softmax": not renormalise,
           "router_score_function": "softmax", "router_dtype": "fp32", "capacity_factor": None,
           "aux_loss_type": "aux_loss",
           "aux_loss_coeff": float(hf.get("router_aux_loss_coef", 0.001))}
    if layers is not None and 0 in layers:
        moe["layer_freq"] = layers
    if ffn is not None:
        moe["ffn_hidden_size"] = ffn
    if shared is not None:
        moe.update(shared_expert_intermediate_size=shared, shared_expert_gate=True)
    return moe


def moe_architecture(m, base_arch: Optional[str]) -> str:
    """Which MoE architecture the phoenix model ``m`` (a ModelConfig with ``moe``) exports
    as: the source's when it was imported from one, else by the shared expert."""
    if base_arch in MOE_ARCHITECTURES.values():
        return base_arch
    return "qwen2_moe" if m.moe.shared_expert_intermediate_size else "mixtral"


def moe_to_hf(m, arch: str, base: Optional[dict]) -> dict:
    """The config.json keys of ``m.moe`` for ``arch``; refuses what the architecture cannot
    hold (by the phoenix key)."""
    moe, n = m.moe, m.num_layers
    layers = [int(i in moe.moe_layers(n)) for i in range(n)]
    problems = []
    if moe.router_score_function != "softmax":
        problems.append("model.moe.router_score_function must be softmax")
    if moe.router_enable_expert_bias:
        problems.append("model.moe.router_enable_expert_bias must be false")
    shared = moe.shared_expert_intermediate_size
    if arch == "mixtral":
        if moe.router_pre_softmax:
            problems.append("model.moe.router_pre_softmax must be false (Mixtral renormalises "
                            "the top-k weights)")
        if shared:
            problems.append("model.moe.shared_expert_intermediate_size must be unset")
        if 0 in layers:
            problems.append("model.moe.layer_freq must make every layer MoE")
        if m.add_qkv_bias:
            problems.append("model.add_qkv_bias must be false")
    elif not shared or not moe.shared_expert_gate:
        problems.append("model.moe.shared_expert_intermediate_size and shared_expert_gate are "
                        "required (every Qwen2-MoE layer has a gated shared expert)")
    if problems:
        raise ConversionError(f"phoenix-to-hf: this MoE model does not export as {arch}: "
                              + "; ".join(problems))
    ffn = moe.expert_ffn_hidden_size(m.ffn_hidden_size)
    base = base or {}
    hf = {"num_experts_per_tok": moe.router_topk, "router_aux_loss_coef": moe.aux_loss_coeff,
          "output_router_logits": bool(base.get("output_router_logits", False))}
    if arch == "mixtral":
        return {**hf, "num_local_experts": moe.num_experts, "intermediate_size": ffn,
                "router_jitter_noise": 0.0}
    hf.update(num_experts=moe.num_experts, moe_intermediate_size=ffn,
              shared_expert_intermediate_size=shared, norm_topk_prob=not moe.router_pre_softmax,
              qkv_bias=m.add_qkv_bias, decoder_sparse_step=1,
              mlp_only_layers=[i for i, v in enumerate(layers) if not v])
    if base.get("architectures") == ["Qwen2MoeForCausalLM"] and \
            base.get("num_hidden_layers") == n and qwen2_moe_layers(base) == layers:
        hf.update(decoder_sparse_step=base.get("decoder_sparse_step", 1),  # the source's spelling
                  mlp_only_layers=base.get("mlp_only_layers") or [])
    return hf


# ------------------------------------------------------------------ tensors


@dataclass(frozen=True)
class MoEShape:
    """What the MoE tensor map needs: the architecture's names, experts, MoE layers."""

    arch: str
    num_experts: int
    layers: frozenset
    shared: bool


def moe_shape(model: dict) -> Optional[MoEShape]:
    """The MoEShape of a phoenix model section (plain data); None for a dense model."""
    moe = model.get("moe")
    if not moe:
        return None
    freq, n = moe.get("layer_freq", 1), model["num_layers"]
    layers = [i for i in range(n) if i % freq == 0] if isinstance(freq, int) else \
        [i for i, v in enumerate(freq) if v]
    shared = bool(moe.get("shared_expert_intermediate_size"))
    return MoEShape(arch="qwen2_moe" if shared else "mixtral", num_experts=int(moe["num_experts"]),
                    layers=frozenset(layers), shared=shared)


def _expert_names(p: str, e: int, arch: str) -> tuple[str, str, str]:
    """HF (gate, up, down) weight names of routed expert ``e`` of layer prefix ``p``."""
    if arch == "mixtral":
        q = f"{p}block_sparse_moe.experts.{e}."
        return q + "w1.weight", q + "w3.weight", q + "w2.weight"
    q = f"{p}mlp.experts.{e}."
    return q + "gate_proj.weight", q + "up_proj.weight", q + "down_proj.weight"


def _router_name(p: str, arch: str) -> str:
    return p + ("block_sparse_moe.gate.weight" if arch == "mixtral" else "mlp.gate.weight")


def _shared_names(p: str) -> tuple[str, str, str, str]:
    q = p + "mlp.shared_expert."
    return (q + "gate_proj.weight", q + "up_proj.weight", q + "down_proj.weight",
            p + "mlp.shared_expert_gate.weight")


def moe_mlp_names(i: int, s: MoEShape) -> list[str]:
    """The HF tensors of the MLP of MoE layer ``i``."""
    p = f"model.layers.{i}."
    names = [_router_name(p, s.arch)]
    for e in range(s.num_experts):
        names += _expert_names(p, e, s.arch)
    if s.shared:
        names += _shared_names(p)
    return names


def moe_mlp_to_megatron(i: int, hf: dict[str, torch.Tensor], s: MoEShape) -> dict[str, torch.Tensor]:
    """Megatron tensors of the MLP of MoE layer ``i`` from its HF tensors."""
    p, m = f"model.layers.{i}.", f"decoder.layers.{i}.mlp."
    out = {m + "router.weight": hf[_router_name(p, s.arch)]}
    for e in range(s.num_experts):
        gate, up, down = _expert_names(p, e, s.arch)
        x = f"{m}experts.local_experts.{e}."
        out[x + "linear_fc1.weight"] = torch.cat([hf[gate], hf[up]])
        out[x + "linear_fc2.weight"] = hf[down]
    if s.shared:
        gate, up, down, gate_weight = _shared_names(p)
        out[m + "shared_experts.linear_fc1.weight"] = torch.cat([hf[gate], hf[up]])
        out[m + "shared_experts.linear_fc2.weight"] = hf[down]
        out[m + "shared_experts.gate_weight"] = hf[gate_weight]
    return out


def moe_mlp_to_hf(i: int, mg: dict[str, torch.Tensor], s: MoEShape) -> dict[str, torch.Tensor]:
    """HF tensors of the MLP of MoE layer ``i`` (inverse of :func:`moe_mlp_to_megatron`)."""
    p, m = f"model.layers.{i}.", f"decoder.layers.{i}.mlp."
    out = {_router_name(p, s.arch): mg[m + "router.weight"]}
    for e in range(s.num_experts):
        gate, up, down = _expert_names(p, e, s.arch)
        x = f"{m}experts.local_experts.{e}."
        out[gate], out[up] = (t.contiguous() for t in mg[x + "linear_fc1.weight"].chunk(2))
        out[down] = mg[x + "linear_fc2.weight"]
    if s.shared:
        gate, up, down, gate_weight = _shared_names(p)
        out[gate], out[up] = (t.contiguous() for t in
                              mg[m + "shared_experts.linear_fc1.weight"].chunk(2))
        out[down] = mg[m + "shared_experts.linear_fc2.weight"]
        out[gate_weight] = mg[m + "shared_experts.gate_weight"]
    return out
