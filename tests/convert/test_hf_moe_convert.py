"""Mixtral and Qwen2-MoE <-> phoenix against transformers (see test_hf_convert.py for the
dense models and the harness reused here).

Tiny random fp32 models from config objects: a Mixtral of 4 experts (top-2, renormalised)
and a Qwen2-MoE of 4 experts (top-2, ``norm_topk_prob=False``, a gated shared expert, QKV
bias, and a dense layer through ``mlp_only_layers``). Imported at TP=PP=EP=1, their logits
match transformers' in one process and at EP=2 (two gloo ranks, the checkpoint resharded
by dist_checkpointing); the export gives every source tensor back bit for bit and loads in
transformers. The routers are re-drawn at a scale where no two top-k scores tie, so the
expert choice is the same on both sides.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
from test_hf_convert import LOGIT_TOL, SEQ, VOCAB, _logits, _tensors, tokens

os.environ.setdefault("HF_HUB_OFFLINE", "1")

BASE = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, intermediate_size=96,
            vocab_size=VOCAB, max_position_embeddings=SEQ, tie_word_embeddings=False)
CASES = {
    "mixtral": ("MixtralConfig", dict(num_hidden_layers=2, num_local_experts=4,
                                      num_experts_per_tok=2, rms_norm_eps=1e-5)),
    "qwen2_moe": ("Qwen2MoeConfig", dict(num_hidden_layers=3, num_experts=4, num_experts_per_tok=2,
                                         moe_intermediate_size=32, shared_expert_intermediate_size=48,
                                         norm_topk_prob=False, mlp_only_layers=[1],
                                         rms_norm_eps=1e-6)),
}


def make_hf_model(kind: str, out_dir: str):
    import transformers

    config_cls, kw = CASES[kind]
    config = getattr(transformers, config_cls)(**BASE, **kw)
    config._attn_implementation = "eager"
    torch.manual_seed(len(kind))
    model = getattr(transformers, config_cls.replace("Config", "ForCausalLM"))(config).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):  # ones / zeros at init: make them count
                p.copy_(torch.randn_like(p) * 0.3 + (1.0 if "norm" in name else 0.0))
            elif name.endswith("gate.weight") and "shared" not in name:  # routers: no ties
                p.copy_(torch.randn_like(p))  # (Qwen2-MoE's starts at zero: all tied)
    model.save_pretrained(out_dir)
    return model


def import_and_check(hf_dirs: dict, out_root: str) -> dict:
    """One rank: import every model, TP=1 logits, export (round trip)."""
    from phoenix.convert.hf_export import phoenix_to_hf
    from phoenix.convert.hf_import import hf_to_phoenix

    results = {}
    for kind, hf_dir in hf_dirs.items():
        out = os.path.join(out_root, kind)
        hf_to_phoenix(hf_dir, out, ep=2, progress=False)
        logits = _logits(out, os.path.join(out_root, "scratch"), {})
        exported = os.path.join(out_root, kind + "_hf")
        phoenix_to_hf(out, exported, progress=False)
        results[kind] = {"logits": logits, "out": out, "exported": exported}
    return results


def ep2_logits(paths: dict, scratch: str) -> dict:
    from megatron.core import parallel_state as ps

    got = {kind: _logits(path, scratch, {"ep": 2}) for kind, path in paths.items()}
    assert ps.get_expert_model_parallel_world_size() == 2  # each rank held 2 of the 4 experts
    return got


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf_moe")
    dirs = {kind: str(root / kind) for kind in CASES}
    return {kind: make_hf_model(kind, dirs[kind]) for kind in CASES}, dirs


@pytest.fixture(scope="module")
def converted(hf_models, tmp_path_factory):
    from phoenix.testing.distributed import run_distributed

    (results,) = run_distributed(import_and_check, 1, hf_models[1],
                                 str(tmp_path_factory.mktemp("conv_moe")))
    return results


@pytest.fixture(scope="module")
def reference_logits(hf_models):
    with torch.no_grad():
        return {kind: m(tokens()).logits.float() for kind, m in hf_models[0].items()}


@pytest.mark.slow
@pytest.mark.parametrize("kind", list(CASES))
def test_imported_moe_logits_match_transformers_tp1(converted, reference_logits, kind):
    err = (converted[kind]["logits"] - reference_logits[kind]).abs().max().item()
    print(f"{kind} TP=1 max |logit error| {err:.3g}")
    assert err <= LOGIT_TOL


@pytest.mark.slow
def test_imported_moe_logits_match_at_ep2(converted, reference_logits, tmp_path):
    from phoenix.testing.distributed import run_distributed

    paths = {kind: r["out"] for kind, r in converted.items()}
    ranks = run_distributed(ep2_logits, 2, paths, str(tmp_path))
    for kind in CASES:
        for rank, got in enumerate(ranks):  # both EP ranks see the same tokens
            err = (got[kind] - reference_logits[kind]).abs().max().item()
            print(f"{kind} EP=2 rank {rank} max |logit error| {err:.3g}")
            assert err <= LOGIT_TOL, (kind, rank, err)


@pytest.mark.slow
@pytest.mark.parametrize("kind", list(CASES))
def test_moe_round_trip_is_bit_exact_and_loads_in_transformers(converted, hf_models,
                                                              reference_logits, kind):
    from transformers import AutoModelForCausalLM

    from phoenix.convert.hf_config import model_from_hf

    exported = converted[kind]["exported"]
    source, back = _tensors(hf_models[1][kind]), _tensors(exported)
    assert sorted(source) == sorted(back)
    for name in source:
        assert source[name].dtype == back[name].dtype and torch.equal(source[name], back[name]), name
    config = json.loads(open(os.path.join(exported, "config.json")).read())
    original = json.loads(open(os.path.join(hf_models[1][kind], "config.json")).read())
    assert config["architectures"] == original["architectures"]
    assert model_from_hf(config) == model_from_hf(original)
    for key in ("num_experts", "num_local_experts", "num_experts_per_tok", "norm_topk_prob",
                "mlp_only_layers", "decoder_sparse_step", "moe_intermediate_size",
                "shared_expert_intermediate_size", "intermediate_size", "qkv_bias",
                "router_aux_loss_coef"):
        assert config.get(key) == original.get(key), key
    model = AutoModelForCausalLM.from_pretrained(exported, attn_implementation="eager").eval()
    with torch.no_grad():
        assert torch.equal(model(tokens()).logits, reference_logits[kind])


# ------------------------------------------------------------ refusals (no model is built)


def _config(kind: str, **changes) -> dict:
    import transformers

    config_cls, kw = CASES[kind]
    hf = getattr(transformers, config_cls)(**BASE, **kw).to_dict()
    hf["architectures"] = [config_cls.replace("Config", "ForCausalLM")]
    return {**hf, **changes}


@pytest.mark.parametrize("kind,changes,message", [
    ("mixtral", {"router_jitter_noise": 0.1}, r"router_jitter_noise=0.1: not supported"),
    ("mixtral", {"sliding_window": 16}, r"sliding_window=16: smaller than"),
    ("mixtral", {"num_experts_per_tok": 1}, r"num_experts_per_tok=1 with renormalised top-k"),
    ("mixtral", {"num_experts_per_tok": 5}, r"num_experts_per_tok=5: more than the 4 experts"),
    ("mixtral", {"moe_intermediate_size": 32}, r"key\(s\) \['moe_intermediate_size'\]: not "
                                               r"supported by the mixtral converter"),
    ("qwen2_moe", {"mlp_only_layers": [0, 1, 2]}, r"no layer is MoE"),
    ("qwen2_moe", {"mlp_only_layers": [3]}, r"mlp_only_layers=\[3\]: must list layer indices"),
    ("qwen2_moe", {"decoder_sparse_step": 0}, r"decoder_sparse_step=0: must be an integer >= 1"),
    ("qwen2_moe", {"shared_expert_intermediate_size": 0},
     r"shared_expert_intermediate_size=0: must be an integer >= 1"),
    ("qwen2_moe", {"use_sliding_window": True}, r"use_sliding_window=true"),
    ("qwen2_moe", {"router_jitter_noise": 0.0}, r"key\(s\) \['router_jitter_noise'\]"),
])
def test_unsupported_moe_config_is_refused_by_name(kind, changes, message):
    from phoenix.convert import ConversionError
    from phoenix.convert.hf_config import model_from_hf

    with pytest.raises(ConversionError, match=message):
        model_from_hf(_config(kind, **changes))


def test_moe_config_mapping():
    from phoenix.convert.hf_config import model_from_hf

    mixtral = model_from_hf(_config("mixtral", output_router_logits=True))
    assert mixtral["moe"] == {"num_experts": 4, "router_topk": 2, "router_pre_softmax": False,
                              "router_score_function": "softmax", "router_dtype": "fp32",
                              "capacity_factor": None, "aux_loss_type": "aux_loss",
                              "aux_loss_coeff": 0.001}
    assert mixtral["ffn_hidden_size"] == 96 and not mixtral["add_qkv_bias"]
    qwen = model_from_hf(_config("qwen2_moe", decoder_sparse_step=2, mlp_only_layers=[],
                                 num_hidden_layers=4, router_aux_loss_coef=0.01))
    assert qwen["add_qkv_bias"] and qwen["ffn_hidden_size"] == 96
    assert {k: qwen["moe"][k] for k in ("layer_freq", "ffn_hidden_size", "router_pre_softmax",
                                        "shared_expert_intermediate_size", "shared_expert_gate",
                                        "aux_loss_coeff")} == {
        "layer_freq": [0, 1, 0, 1], "ffn_hidden_size": 32, "router_pre_softmax": True,
        "shared_expert_intermediate_size": 48, "shared_expert_gate": True, "aux_loss_coeff": 0.01}
    assert model_from_hf(_config("qwen2_moe", norm_topk_prob=True))["moe"]["router_pre_softmax"] \
        is False
    assert not model_from_hf(_config("qwen2_moe", qkv_bias=False))["add_qkv_bias"]


@pytest.mark.parametrize("kind,moe,message", [
    ("mixtral", {"router_pre_softmax": True}, r"as mixtral: model.moe.router_pre_softmax must be false"),
    ("mixtral", {"layer_freq": 2}, r"layer_freq must make every layer MoE"),
    ("mixtral", {"router_score_function": "sigmoid"}, r"router_score_function must be softmax"),
    ("qwen2_moe", {"shared_expert_gate": False}, r"as qwen2_moe: .*shared_expert_gate are required"),
])
def test_moe_export_refuses_what_the_architecture_cannot_hold(kind, moe, message):
    from phoenix.config import ModelConfig, MoEConfig
    from phoenix.convert import ConversionError
    from phoenix.convert.hf_config import hf_from_model, model_from_hf

    base = _config(kind)
    section = model_from_hf(base)
    section.pop("rope")
    m = ModelConfig(**{**section, "moe": MoEConfig(**{**section["moe"], **moe})})
    with pytest.raises(ConversionError, match=message):
        hf_from_model(m, VOCAB, "float32", base)


def test_ep_must_divide_the_experts_and_names_are_checked(hf_models, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    from phoenix.convert import ConversionError
    from phoenix.convert.hf_import import hf_to_phoenix

    folder = tmp_path / "mixtral"
    shutil.copytree(hf_models[1]["mixtral"], folder)
    with pytest.raises(ConversionError, match=r"num_experts 4 is not divisible by --ep 3"):
        hf_to_phoenix(folder, tmp_path / "out", ep=3, progress=False)
    tensors = load_file(folder / "model.safetensors")
    fused = {**tensors, "model.layers.0.block_sparse_moe.experts.gate_up_proj": torch.zeros(1)}
    save_file(fused, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ConversionError, match=r"does not explain .*experts.gate_up_proj"):
        hf_to_phoenix(folder, tmp_path / "out", progress=False)
    del tensors["model.layers.1.block_sparse_moe.experts.3.w2.weight"]
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ConversionError, match=r"missing: \['model.layers.1.block_sparse_moe."
                                              r"experts.3.w2.weight'\]"):
        hf_to_phoenix(folder, tmp_path / "out", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mixtral"]


def test_an_upcycled_dense_import_exports_as_mixtral_and_back():
    """A Llama import given a model.moe (phoenix upcycling) exports as Mixtral; a Qwen2 one
    (QKV bias, no shared expert) fits neither MoE architecture and is refused."""
    from phoenix.config import ModelConfig, MoEConfig
    from phoenix.convert import ConversionError
    from phoenix.convert.hf_config import hf_from_model, model_from_hf

    llama = {**_config("mixtral"), "architectures": ["LlamaForCausalLM"], "model_type": "llama"}
    for key in ("num_local_experts", "num_experts_per_tok", "router_aux_loss_coef",
                "router_jitter_noise", "output_router_logits"):
        llama.pop(key)
    section = model_from_hf(llama)
    section.pop("rope")
    moe = MoEConfig(num_experts=8, router_topk=2, aux_loss_coeff=0.01)
    hf = hf_from_model(ModelConfig(**section, moe=moe), VOCAB, "float32", llama)
    assert hf["architectures"] == ["MixtralForCausalLM"] and hf["num_local_experts"] == 8
    back = model_from_hf(hf)
    assert back["moe"]["num_experts"] == 8 and back["ffn_hidden_size"] == section["ffn_hidden_size"]
    qwen2 = {**llama, "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2"}
    with pytest.raises(ConversionError, match=r"as mixtral: model.add_qkv_bias must be false"):
        hf_from_model(ModelConfig(**{**section, "add_qkv_bias": True}, moe=moe), VOCAB,
                      "float32", qwen2)
