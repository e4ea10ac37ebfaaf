"""model.moe and expert parallelism: bad input is one ConfigError naming the key; the
TransformerConfig fields it maps to; dense configs are untouched."""

from __future__ import annotations

import pytest

from phoenix.config import ConfigError, MoEConfig, build_config, dump_config, to_dict
from phoenix.runtime.capabilities import check_capabilities

from tests.config.test_config import base, key


def moe_base(moe: dict | None = None, parallel: dict | None = None, model: dict | None = None,
             **sections) -> dict:
    model = {"preset": "tiny_moe", **(model or {})}
    if moe is not None:
        model["moe"] = moe
    return base(model=model, parallel=parallel or {}, runtime={"device": "cpu"}, **sections)


def test_tiny_moe_preset_loads_and_round_trips():
    cfg = build_config(moe_base())
    m = cfg.model.moe
    assert isinstance(m, MoEConfig) and (m.num_experts, m.router_topk, m.ffn_hidden_size) == (4, 2, 64)
    assert m.aux_loss_coeff == 1e-2 and m.router_dtype == "fp32" and m.token_dispatcher == "alltoall"
    import yaml
    assert build_config(yaml.safe_load(dump_config(cfg))) == cfg


def test_moe_override_merges_into_the_preset_section():
    cfg = build_config(moe_base(), ["model.moe.aux_loss_coeff=0.001", "model.moe.router_topk=1",
                                    "model.moe.router_pre_softmax=true"])
    m = cfg.model.moe
    assert (m.num_experts, m.ffn_hidden_size, m.aux_loss_coeff, m.router_topk) == (4, 64, 1e-3, 1)


def test_dense_default_has_no_moe():
    cfg = build_config(base())
    assert cfg.model.moe is None and cfg.parallel.expert == 1 and cfg.parallel.expert_tensor is None
    assert "moe" in to_dict(cfg)["model"]


@pytest.mark.parametrize("moe,pattern", [
    ({"router_topk": 5}, "model.moe.router_topk: must be in [1, num_experts=4], got 5"),
    ({"router_topk": 0}, "model.moe.router_topk: must be in [1, num_experts=4], got 0"),
    ({"num_experts": 0}, "model.moe.num_experts: must be > 0, got 0"),
    ({"router_topk": 1}, "model.moe.router_topk: 1 with softmax scores needs "
                         "model.moe.router_pre_softmax=true"),
    ({"shared_expert_gate": True}, "model.moe.shared_expert_gate: needs "
                                   "model.moe.shared_expert_intermediate_size"),
    ({"shared_expert_intermediate_size": -64}, "model.moe.shared_expert_intermediate_size: must be > 0"),
    ({"router_enable_expert_bias": True}, "model.moe.router_enable_expert_bias: needs "
                                          "model.moe.router_score_function=sigmoid"),
    ({"aux_loss_coeff": -1.0}, "model.moe.aux_loss_coeff: must be >= 0"),
    ({"pad_expert_input_to_capacity": True}, "model.moe.pad_expert_input_to_capacity: needs "
                                             "model.moe.capacity_factor"),
    ({"layer_freq": 0}, "model.moe.layer_freq: must be >= 1"),
    ({"layer_freq": [0, 2, 1, 1]}, "model.moe.layer_freq: a list must hold only 0"),
    ({"layer_freq": [0, 1]}, "model.moe.layer_freq: the list has 2 entries, model.num_layers is 4"),
    ({"token_dispatcher": "deepep"}, "model.moe.token_dispatcher: 'deepep' is not one of"),
    ({"num_expert": 4}, "unknown config key 'model.moe.num_expert' (did you mean 'num_experts'?)"),
])
def test_bad_moe_section_names_key(moe, pattern):
    with pytest.raises(ConfigError, match=key(pattern)):
        build_config(moe_base(moe))


def test_moe_layers_follow_megatron_layer_freq():
    assert MoEConfig(num_experts=4, layer_freq=2).moe_layers(5) == [0, 2, 4]
    assert MoEConfig(num_experts=4, layer_freq=[0, 1, 1]).moe_layers(3) == [1, 2]


@pytest.mark.parametrize("moe,parallel,world,pattern", [
    (None, {"expert": 3}, 3, "parallel.expert: model.moe.num_experts 4 is not divisible by expert "
                             "parallel size 3"),
    ({"ffn_hidden_size": 66}, {"tensor": 4, "sequence_parallel": True, "expert_tensor": 4}, 4,
     "parallel.expert_tensor: the expert ffn_hidden_size 66 is not divisible by expert tensor "
     "parallel size 4"),
    ({"shared_expert_intermediate_size": 66}, {"tensor": 4, "sequence_parallel": True,
                                               "expert_tensor": 1}, 4,
     "model.moe.shared_expert_intermediate_size: 66 is not divisible by tensor parallel size 4"),
    (None, {"tensor": 2}, 2, "parallel.sequence_parallel: MoE with parallel.tensor > 1 needs "
                             "sequence parallelism"),
    # ETP*EP must divide world/PP = TP*CP*DP (megatron's initialize_model_parallel)
    (None, {"expert": 4, "pipeline": 2}, 4, "parallel.expert: expert_tensor*expert = 1*4 must "
                                            "divide world size / pipeline = 4/2"),
    (None, {"expert": 2, "tensor": 2, "sequence_parallel": True}, 2,
     "parallel.expert: expert_tensor*expert = 2*2 must divide world size / pipeline = 2/1"),
])
def test_expert_layout_errors_name_key(moe, parallel, world, pattern):
    with pytest.raises(ConfigError, match=key(pattern)):
        cfg = build_config(moe_base(moe, parallel))
        cfg.validate_layout(world)


@pytest.mark.parametrize("parallel,world", [
    ({"expert": 2}, 2),                                                   # EP over DP
    ({"expert": 2}, 4),                                                   # EP x expert-DP
    ({"expert": 2, "pipeline": 2}, 4),
    ({"expert": 2, "tensor": 2, "sequence_parallel": True}, 4),           # ETP=TP=2
    ({"expert": 2, "tensor": 2, "sequence_parallel": True, "expert_tensor": 1}, 2),  # EP over TP
    ({"expert": 4}, 4),
])
def test_valid_expert_layouts_pass(parallel, world):
    build_config(moe_base(parallel=parallel)).validate_layout(world)


def test_expert_parallel_needs_moe():
    with pytest.raises(ConfigError, match=key("parallel.expert: 2 needs a MoE model (set model.moe)")):
        build_config(base(parallel={"expert": 2}))
    with pytest.raises(ConfigError, match=key("parallel.expert_tensor: needs a MoE model")):
        build_config(base(parallel={"expert_tensor": 1, "tensor": 2}))
    with pytest.raises(ConfigError, match=key("parallel.expert_tensor: must be > 0")):
        build_config(moe_base(parallel={"expert_tensor": 0}))


def test_bias_needs_expert_tensor_1():
    with pytest.raises(ConfigError, match=key("model.add_bias_linear: megatron-core supports "
                                              "biases in MoE experts only with parallel.expert_tensor=1")):
        build_config(moe_base(model={"add_bias_linear": True},
                              parallel={"tensor": 2, "sequence_parallel": True}))


@pytest.mark.parametrize("moe,what", [
    ({"grouped_gemm": True}, "model.moe.grouped_gemm: needs CUDA with Transformer Engine "
                             "(runtime.device is cpu)"),
    ({"token_dispatcher": "flex"}, "model.moe.token_dispatcher: needs CUDA with Transformer Engine"),
    ({"permute_fusion": True}, "model.moe.permute_fusion: needs CUDA with Transformer Engine"),
])
def test_te_only_features_refused_on_cpu(moe, what):
    cfg = build_config(moe_base(moe))  # valid as a config: a CUDA + TE machine runs it
    with pytest.raises(ConfigError, match=key(what)):
        check_capabilities(cfg)


def test_transformer_config_fields():
    from phoenix.model.builder import moe_kwargs

    assert moe_kwargs(build_config(base())) == {}  # dense: TransformerConfig as before
    cfg = build_config(moe_base({"layer_freq": [0, 1, 1, 1], "z_loss_coeff": 1e-3,
                                 "shared_expert_intermediate_size": 128,
                                 "shared_expert_gate": True}),
                       ["parallel.expert=2"])
    kw = moe_kwargs(cfg)
    assert kw["num_moe_experts"] == 4 and kw["moe_router_topk"] == 2
    assert kw["moe_ffn_hidden_size"] == 64 and kw["moe_layer_freq"] == [0, 1, 1, 1]
    assert kw["moe_aux_loss_coeff"] == 1e-2 and kw["moe_z_loss_coeff"] == 1e-3
    assert kw["moe_router_load_balancing_type"] == "aux_loss"
    assert kw["moe_shared_expert_intermediate_size"] == 128 and kw["moe_shared_expert_gate"]
    assert kw["moe_token_dispatcher_type"] == "alltoall" and kw["moe_router_dtype"] == "fp32"
    assert kw["expert_model_parallel_size"] == 2 and kw["expert_tensor_parallel_size"] == 1
    # every key is a real TransformerConfig field
    from megatron.core.transformer import TransformerConfig
    import dataclasses
    fields = {f.name for f in dataclasses.fields(TransformerConfig)}
    assert set(kw) <= fields, set(kw) - fields
    # under TP x CP, megatron's per-token aux/z losses are scaled by the local token count:
    # phoenix multiplies the coefficients back (parity: tests/train/test_moe_layout_parity.py)
    tp2 = moe_kwargs(build_config(moe_base({"z_loss_coeff": 1e-3}),
                                  ["parallel.tensor=2", "parallel.sequence_parallel=true"]))
    assert tp2["moe_aux_loss_coeff"] == 2e-2 and tp2["moe_z_loss_coeff"] == 2e-3
    assert tp2["expert_tensor_parallel_size"] == 2
    # the expert width defaults to the dense one
    no_width = build_config(moe_base({"ffn_hidden_size": None}))
    assert moe_kwargs(no_width)["moe_ffn_hidden_size"] == no_width.model.ffn_hidden_size == 176
