"""Hugging Face ``config.json`` <-> phoenix ``model`` section.

Supported: ``LlamaForCausalLM`` (Llama 2, 3, 3.1, 3.2), ``Qwen2ForCausalLM`` (Qwen2 and
2.5: QKV bias), ``MistralForCausalLM`` (without a sliding window), and the MoE
``MixtralForCausalLM`` and ``Qwen2MoeForCausalLM`` (their ``model.moe``:
:mod:`phoenix.convert.hf_moe`). Every key of the
config is either mapped, checked against the one value phoenix implements, or known to
carry no architecture (ids, inference switches, bookkeeping); any other key is refused by
name, never dropped.

RoPE is read from ``rope_parameters`` (transformers 5) or ``rope_theta`` + ``rope_scaling``
(earlier versions): ``default`` -> none, ``linear``, ``dynamic`` -> dynamic_ntk (with
``L = max_position_embeddings``, as transformers does), ``yarn`` and ``llama3``. On export
both spellings are written.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

from phoenix.config import ModelConfig, MoEConfig, RopeConfig
from phoenix.convert.common import ConversionError
from phoenix.convert.hf_moe import MOE_KEYS, moe_architecture, moe_from_hf, moe_to_hf


ARCHITECTURES = {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2",
                 "MistralForCausalLM": "mistral", "MixtralForCausalLM": "mixtral",
                 "Qwen2MoeForCausalLM": "qwen2_moe"}

# Keys that describe no weights or numerics of the forward pass.
_IGNORED = {
    "architectures", "model_type", "transformers_version", "dtype", "torch_dtype",
    "bos_token_id", "eos_token_id", "pad_token_id", "use_cache", "initializer_range",
    "_name_or_path", "output_attentions", "output_hidden_states", "return_dict",
    "tie_encoder_decoder", "is_decoder", "is_encoder_decoder", "chunk_size_feed_forward",
    "id2label", "label2id", "problem_type", "tokenizer_class", "prefix", "task_specific_params",
    "max_length", "pruned_heads", "torchscript", "use_bfloat16", "add_cross_attention",
    "finetuning_task", "cross_attention_hidden_size", "decoder_start_token_id",
    "sep_token_id", "typical_p", "layer_types", "max_window_layers",
}
# Keys mapped into the model section (read below).
_MAPPED = {
    "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "max_position_embeddings", "vocab_size", "rms_norm_eps",
    "tie_word_embeddings", "rope_parameters", "rope_theta", "rope_scaling", "head_dim",
    "hidden_act", "sliding_window", "use_sliding_window", "attention_bias", "mlp_bias",
    "pretraining_tp", "original_max_position_embeddings", "attention_dropout",
}
_ROPE_KEYS = {
    "default": {"rope_type", "type", "rope_theta"},
    "linear": {"rope_type", "type", "rope_theta", "factor"},
    "dynamic": {"rope_type", "type", "rope_theta", "factor"},
    "yarn": {"rope_type", "type", "rope_theta", "factor", "original_max_position_embeddings",
             "beta_fast", "beta_slow", "mscale", "mscale_all_dim", "attention_factor", "truncate"},
    "llama3": {"rope_type", "type", "rope_theta", "factor", "original_max_position_embeddings",
               "low_freq_factor", "high_freq_factor"},
}


def architecture_of(hf: dict) -> str:
    """``llama`` / ``qwen2`` / ``mistral`` / ``mixtral`` / ``qwen2_moe`` from
    ``architectures``; refuses anything else."""
    archs = hf.get("architectures") or []
    if len(archs) != 1 or archs[0] not in ARCHITECTURES:
        raise ConversionError(f"config.json architectures {archs}: not supported (supported: "
                              f"{', '.join(ARCHITECTURES)})")
    return ARCHITECTURES[archs[0]]


def _require(hf: dict, key: str, allowed, why: str) -> None:
    if key in hf and hf[key] not in allowed:
        raise ConversionError(f"config.json {key}={hf[key]!r}: not supported ({why})")


def _rope_params(hf: dict) -> dict:
    """The one global RoPE dict, whichever spelling the file uses."""
    params = hf.get("rope_parameters")
    if params is None:
        params = dict(hf.get("rope_scaling") or {})
        params.setdefault("rope_theta", hf.get("rope_theta", 10000.0))
    elif not isinstance(params, dict) or "rope_theta" not in params and any(
            isinstance(v, dict) for v in params.values()):
        raise ConversionError("config.json rope_parameters: per-layer-type RoPE is not supported")
    else:
        params = dict(params)
        if "rope_theta" not in params and "rope_theta" in hf:
            params["rope_theta"] = hf["rope_theta"]
    params.setdefault("rope_theta", 10000.0)
    return params


def rope_from_hf(hf: dict) -> RopeConfig:
    """phoenix ``model.rope`` of a config.json; unknown types and keys refused by name."""
    params = _rope_params(hf)
    kind = params.get("rope_type", params.get("type", "default"))
    if kind not in _ROPE_KEYS:
        raise ConversionError(f"config.json rope type {kind!r}: not supported (supported: "
                              f"{', '.join(_ROPE_KEYS)})")
    extra = sorted(set(params) - _ROPE_KEYS[kind])
    if extra:
        raise ConversionError(f"config.json rope_parameters/rope_scaling: key(s) {extra} are not "
                              f"supported with rope type {kind!r}")
    if params.get("partial_rotary_factor", 1.0) != 1.0:
        raise ConversionError("config.json partial_rotary_factor: only 1.0 is supported")
    base = float(params["rope_theta"])
    if kind == "default":
        return RopeConfig(base=base)
    factor = params.get("factor")
    if kind == "linear":
        return RopeConfig(base=base, scaling="linear", factor=float(factor))
    if kind == "dynamic":  # transformers' dynamic NTK starts at max_position_embeddings
        return RopeConfig(base=base, scaling="dynamic_ntk", factor=float(factor),
                          original_max_position_embeddings=int(hf["max_position_embeddings"]))
    original = hf.get("original_max_position_embeddings",  # top level wins (as transformers)
                      params.get("original_max_position_embeddings", hf["max_position_embeddings"]))
    if kind == "yarn":
        if factor is None:
            factor = hf["max_position_embeddings"] / original
        opt = {k: params[k] for k in ("mscale", "mscale_all_dim", "attention_factor")
               if params.get(k) is not None}
        return RopeConfig(base=base, scaling="yarn", factor=float(factor),
                          original_max_position_embeddings=int(original),
                          beta_fast=float(params.get("beta_fast") or 32.0),
                          beta_slow=float(params.get("beta_slow") or 1.0),
                          truncate=bool(params.get("truncate", True)), **opt)
    return RopeConfig(base=base, scaling="llama3", factor=float(factor),
                      original_max_position_embeddings=int(original),
                      low_freq_factor=float(params.get("low_freq_factor", 1.0)),
                      high_freq_factor=float(params.get("high_freq_factor", 4.0)))


# Keys every supported architecture's config.json must give (no transformers default).
_REQUIRED = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
             "max_position_embeddings", "vocab_size")


def read_hf_config(path) -> dict:
    """``config.json`` as a dict; ConversionError naming the file when it is not JSON, not an
    object, or lacks a key the conversion needs."""
    import json

    try:
        hf = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConversionError(f"{path}: not a readable JSON file ({e})") from None
    if not isinstance(hf, dict):
        raise ConversionError(f"{path}: expected a JSON object, got {type(hf).__name__}")
    if "architectures" in hf:  # an unsupported model (GPT-2's n_embd, ...) is named as
        try:                     # such, not reported as a config.json with missing keys
            architecture_of(hf)
        except ConversionError as e:
            raise ConversionError(f"{path}: {str(e).removeprefix('config.json ')}") from None
    missing = [k for k in _REQUIRED if k not in hf]
    if missing:
        raise ConversionError(f"{path}: missing key(s) {missing}")
    return hf


def model_from_hf(hf: dict) -> dict:
    """The phoenix ``model`` section (plain data, as in model.yaml) of a config.json.

    Raises ConversionError naming the key for anything phoenix does not implement."""
    arch = architecture_of(hf)
    unknown = sorted(set(hf) - _IGNORED - _MAPPED - MOE_KEYS.get(arch, set()))
    if unknown:
        raise ConversionError(f"config.json key(s) {unknown}: not supported by the {arch} "
                              f"converter (refused rather than dropped)")
    _require(hf, "hidden_act", ("silu",), "SwiGLU needs silu")
    _require(hf, "mlp_bias", (False,), "phoenix's MLP has no bias")
    _require(hf, "pretraining_tp", (1,), "only 1: the slicing changes the numerics")
    qwen = arch in ("qwen2", "qwen2_moe")
    if not qwen:
        _require(hf, "attention_bias", (False,), "QKV bias is Qwen2's; use add_qkv_bias")
    if qwen and hf.get("use_sliding_window"):
        raise ConversionError("config.json use_sliding_window=true: sliding-window attention "
                              "is not supported")
    if "sliding_window" in hf and arch in ("mistral", "mixtral") and hf["sliding_window"] is not None \
            and hf["sliding_window"] < hf["max_position_embeddings"]:
        raise ConversionError(
            f"config.json sliding_window={hf['sliding_window']}: smaller than "
            f"max_position_embeddings {hf['max_position_embeddings']}; sliding-window attention "
            f"is not supported (set sliding_window to null only if the model was trained "
            f"without it)")
    if any(t != "full_attention" for t in hf.get("layer_types") or []):
        raise ConversionError(f"config.json layer_types: only full_attention is supported, got "
                              f"{sorted(set(hf['layer_types']))}")
    heads, hidden = int(hf["num_attention_heads"]), int(hf["hidden_size"])
    if hf.get("head_dim") not in (None, hidden // heads) or hidden % heads:
        raise ConversionError(f"config.json head_dim={hf.get('head_dim')}: phoenix needs "
                              f"head_dim = hidden_size / num_attention_heads = {hidden / heads:g}")
    rope = rope_from_hf(hf)
    rope_dict = {k: v for k, v in vars(rope).items() if v != getattr(RopeConfig, k, None)}
    section = {
        "num_layers": int(hf["num_hidden_layers"]), "hidden_size": hidden,
        "ffn_hidden_size": int(hf["intermediate_size"]), "num_attention_heads": heads,
        "num_query_groups": int(hf.get("num_key_value_heads") or heads),
        "max_seq_length": int(hf["max_position_embeddings"]),
        "vocab_size": int(hf["vocab_size"]), "make_vocab_size_divisible_by": 128,
        "normalization": "RMSNorm", "norm_epsilon": float(hf.get("rms_norm_eps", 1e-6)),
        "activation": "swiglu", "position_embedding": "rope", "rope": rope_dict,
        "tie_embeddings": bool(hf.get("tie_word_embeddings", arch == "qwen2")),
        "add_bias_linear": False,
        "add_qkv_bias": arch == "qwen2" or arch == "qwen2_moe" and bool(hf.get("qkv_bias", True)),
        "init_method_std": float(hf.get("initializer_range", 0.02)),
        "attention_dropout": float(hf.get("attention_dropout", 0.0)),
    }
    if arch in MOE_KEYS:
        section["moe"] = moe_from_hf(hf, arch)
    ModelConfig(**{**section, "rope": rope, "moe": section.get("moe") and MoEConfig(
        **section["moe"])})  # validates (raises ConfigError)
    return section


def _rope_to_hf(rope: RopeConfig) -> dict:
    if rope.scaling == "ntk":  # static NTK is plain RoPE with the raised base
        raise ConversionError("model.rope.scaling ntk: export it as scaling none with the NTK "
                              "base (transformers has no static NTK type)")
    params: dict = {"rope_theta": rope.base}
    if rope.scaling == "none":
        return {**params, "rope_type": "default"}
    params["factor"] = rope.factor
    if rope.scaling == "linear":
        return {**params, "rope_type": "linear"}
    if rope.scaling == "dynamic_ntk":
        return {**params, "rope_type": "dynamic"}
    params["original_max_position_embeddings"] = rope.original_max_position_embeddings
    if rope.scaling == "yarn":
        params.update(rope_type="yarn", beta_fast=rope.beta_fast, beta_slow=rope.beta_slow,
                      truncate=rope.truncate)
        for key in ("mscale", "mscale_all_dim", "attention_factor"):
            if getattr(rope, key) is not None:
                params[key] = getattr(rope, key)
        return params
    return {**params, "rope_type": "llama3", "low_freq_factor": rope.low_freq_factor,
            "high_freq_factor": rope.high_freq_factor}


def hf_from_model(m: ModelConfig, vocab_size: int, dtype: str,
                  base: Optional[dict] = None) -> dict:
    """config.json of the phoenix model ``m`` (true ``vocab_size``, torch ``dtype`` name).

    ``base`` (the config.json the model was imported from) keeps the architecture and the
    keys phoenix does not own (token ids, ...); every key phoenix owns is rewritten."""
    if m.normalization != "RMSNorm" or m.activation != "swiglu" or m.add_bias_linear \
            or m.qk_layernorm or m.position_embedding != "rope":
        raise ConversionError("phoenix-to-hf: only Llama-style models export (RMSNorm, swiglu, "
                              "rope, no linear biases, no qk_layernorm)")

    arch = architecture_of(base) if base else ("qwen2" if m.add_qkv_bias else "llama")
    if m.moe is not None:  # an upcycled dense import exports as Mixtral / Qwen2-MoE
        arch = moe_architecture(m, arch)
    elif arch in ("mixtral", "qwen2_moe") or (arch == "qwen2") != m.add_qkv_bias:
        arch = "qwen2" if m.add_qkv_bias else "llama"
    name = {v: k for k, v in ARCHITECTURES.items()}[arch]
    hf = {k: v for k, v in (base or {}).items() if k in _IGNORED | {"pretraining_tp"}}
    if arch in ("mixtral", "qwen2_moe"):
        hf.pop("pretraining_tp", None)
    rope = m.rope or RopeConfig()
    params = _rope_to_hf(rope)
    max_pos = m.max_seq_length
    if rope.scaling == "dynamic_ntk":  # transformers reads dynamic's L from here
        max_pos = rope.original_max_position_embeddings
    heads = m.num_attention_heads
    hf.update({
        "architectures": [name], "model_type": arch, "hidden_size": m.hidden_size,
        "intermediate_size": m.ffn_hidden_size, "num_hidden_layers": m.num_layers,
        "num_attention_heads": heads, "num_key_value_heads": m.num_query_groups or heads,
        "max_position_embeddings": max_pos, "vocab_size": vocab_size,
        "rms_norm_eps": m.norm_epsilon, "tie_word_embeddings": m.tie_embeddings,
        "hidden_act": "silu", "attention_dropout": m.attention_dropout,
        "initializer_range": m.init_method_std, "dtype": dtype,
        "rope_parameters": params, "rope_theta": rope.base,
        "rope_scaling": None if params["rope_type"] == "default" else
        {k: v for k, v in params.items() if k != "rope_theta"},
    })
    if m.moe is not None:
        hf.update(moe_to_hf(m, arch, base))
    if arch in ("qwen2", "qwen2_moe"):
        hf.update(use_sliding_window=False, sliding_window=None,
                  layer_types=["full_attention"] * m.num_layers)
    elif arch == "mixtral":
        hf.update(head_dim=m.hidden_size // heads, sliding_window=None)
    else:
        hf.update(head_dim=m.hidden_size // heads, attention_bias=False)
        if arch == "mistral":
            hf["sliding_window"] = None
        else:
            hf["mlp_bias"] = False
    if not math.isfinite(hf["rms_norm_eps"]):
        raise ConversionError("model.norm_epsilon: not finite")
    return dict(sorted(hf.items()))
