"""RoPE scaling against transformers, the oracle nobody here wrote.

(a) The frequencies and attention scaling of every method equal transformers'
``ROPE_INIT_FUNCTIONS`` over a grid of head dims, factors and sequence lengths.
(b) A tiny phoenix GPTModel (built by phoenix.model.builder in one spawned gloo rank) gives
the logits of ``LlamaForCausalLM`` with the matching ``rope_parameters`` and the same
weights, at 4x the original context; the rotary module megatron really uses has our
frequencies; dropping the scaling breaks the match (so the comparison can fail).
(c) Config errors name the key.
"""

from __future__ import annotations

import math
import os

import pytest
import torch

from phoenix.config import ConfigError, RopeConfig
from phoenix.config.typed import from_dict
from phoenix.model.rope import inv_freq_and_scaling

os.environ.setdefault("HF_HUB_OFFLINE", "1")

ORIGINAL = 16           # original context of the logits test
SEQ = 4 * ORIGINAL      # its sequence length: 4x beyond the original
VOCAB = 512
LAYERS, HIDDEN, HEADS, GROUPS, FFN = 2, 64, 4, 2, 176
HEAD_DIM = HIDDEN // HEADS
LOGIT_TOL = 1e-4
FREQ_TOL = 1e-6


def ntk_base(base: float, factor: float, dim: int) -> float:
    """Static NTK-aware base (bloc97): b·f^(d/(d-2)). transformers has no static NTK; its
    equivalent is the default RoPE with this base as ``rope_theta``."""
    return base * factor ** (dim / (dim - 2))


def hf_rope_parameters(rope: RopeConfig, dim: int) -> tuple[dict, int]:
    """transformers ``rope_parameters`` and ``max_position_embeddings`` matching ``rope``."""
    L = rope.original_max_position_embeddings
    if rope.scaling == "none":
        return {"rope_type": "default", "rope_theta": rope.base}, 4096
    if rope.scaling == "ntk":
        return {"rope_type": "default", "rope_theta": ntk_base(rope.base, rope.factor, dim)}, 4096
    params = {"rope_theta": rope.base, "factor": rope.factor}
    if rope.scaling == "linear":
        return {**params, "rope_type": "linear"}, 4096
    if rope.scaling == "dynamic_ntk":  # transformers' dynamic reads L from max_position_embeddings
        return {**params, "rope_type": "dynamic"}, L
    if rope.scaling == "yarn":
        params.update(rope_type="yarn", original_max_position_embeddings=L,
                      beta_fast=rope.beta_fast, beta_slow=rope.beta_slow, truncate=rope.truncate)
        for key in ("mscale", "mscale_all_dim", "attention_factor"):
            if getattr(rope, key) is not None:
                params[key] = getattr(rope, key)
        return params, int(L * rope.factor)
    assert rope.scaling == "llama3"
    return {**params, "rope_type": "llama3", "original_max_position_embeddings": L,
            "low_freq_factor": rope.low_freq_factor,
            "high_freq_factor": rope.high_freq_factor}, int(L * rope.factor)


def hf_config(rope: RopeConfig, head_dim: int, **kwargs):
    from transformers import LlamaConfig

    params, max_pos = hf_rope_parameters(rope, head_dim)
    defaults = dict(hidden_size=head_dim * 4, num_attention_heads=4, num_key_value_heads=2,
                    num_hidden_layers=1, intermediate_size=8, vocab_size=8)
    return LlamaConfig(**{**defaults, **kwargs}, max_position_embeddings=max_pos,
                       rope_parameters=params)


def hf_inv_freq(rope: RopeConfig, head_dim: int, seq_len: int, **kwargs):
    """transformers' (inv_freq, attention_scaling) for ``rope`` at ``seq_len``."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    config = hf_config(rope, head_dim, **kwargs)
    kind = config.rope_parameters["rope_type"]
    if kind == "default":
        return LlamaRotaryEmbedding.compute_default_rope_parameters(config, device="cpu", seq_len=seq_len)
    return ROPE_INIT_FUNCTIONS[kind](config, "cpu", seq_len)


def rope_of(kind: str, factor: float = 4.0, original: int = ORIGINAL, **extra) -> RopeConfig:
    if kind == "none":
        return RopeConfig(**extra)
    return RopeConfig(scaling=kind, factor=factor, original_max_position_embeddings=original,
                      **extra)


METHODS = ["none", "linear", "ntk", "dynamic_ntk", "yarn", "llama3"]


# ------------------------------------------------------------ (a) the formulas


@pytest.mark.parametrize("kind", METHODS)
@pytest.mark.parametrize("head_dim", [32, 64, 128])
@pytest.mark.parametrize("factor", [2.0, 4.0, 8.0])
def test_inv_freq_and_scaling_match_transformers(kind, head_dim, factor):
    original = 512
    rope = rope_of(kind, factor, original, base=10000.0 if head_dim != 128 else 500000.0)
    for seq_len in (original // 2, original, 4 * original):
        ours, scale = inv_freq_and_scaling(rope, head_dim, seq_len)
        ref, ref_scale = hf_inv_freq(rope, head_dim, seq_len)
        assert ours.dtype == torch.float32 and ours.shape == (head_dim // 2,)
        rel = ((ours.double() - ref.double()).abs() / ref.double().abs()).max().item()
        assert rel <= FREQ_TOL, (kind, head_dim, factor, seq_len, rel)
        assert scale == pytest.approx(float(ref_scale), rel=FREQ_TOL)


@pytest.mark.parametrize("extra", [
    dict(truncate=False), dict(beta_fast=16.0, beta_slow=2.0),
    dict(mscale=1.0, mscale_all_dim=0.5), dict(mscale=0.707, mscale_all_dim=0.0),
    dict(attention_factor=1.3)], ids=lambda e: ",".join(e))
def test_yarn_variants_match_transformers(extra):
    rope = rope_of("yarn", 8.0, 4096, **extra)
    ours, scale = inv_freq_and_scaling(rope, 128)
    ref, ref_scale = hf_inv_freq(rope, 128, None)
    assert ((ours - ref).abs() / ref).max().item() <= FREQ_TOL
    assert scale == pytest.approx(float(ref_scale), rel=FREQ_TOL)


@pytest.mark.parametrize("low,high", [(1.0, 4.0), (2.0, 8.0), (0.5, 1.5)])
def test_llama3_factors_match_transformers(low, high):
    rope = rope_of("llama3", 8.0, 8192, low_freq_factor=low, high_freq_factor=high)
    ours, _ = inv_freq_and_scaling(rope, 128)
    ref, _ = hf_inv_freq(rope, 128, None)
    assert ((ours - ref).abs() / ref).max().item() <= FREQ_TOL


def test_dynamic_ntk_grows_only_beyond_the_original_length():
    rope = rope_of("dynamic_ntk", 4.0, 1024)
    plain, _ = inv_freq_and_scaling(RopeConfig(), 64)
    assert torch.equal(inv_freq_and_scaling(rope, 64, 512)[0], plain)
    assert torch.equal(inv_freq_and_scaling(rope, 64, None)[0], plain)
    assert inv_freq_and_scaling(rope, 64, 4096)[0][-1] < plain[-1]


# ------------------------------------------------------------ (b) whole models


MODEL_CASES = {  # name -> RopeConfig of the logits test (original context 16, seq 64)
    "none": RopeConfig(base=500.0),
    "linear": rope_of("linear"),
    "ntk": rope_of("ntk", base=500.0),
    "dynamic_ntk": rope_of("dynamic_ntk", base=500.0),
    "yarn": rope_of("yarn", 8.0, beta_fast=8.0, beta_slow=0.5),
    "yarn_attention_factor": rope_of("yarn", 4.0, attention_factor=1.25),
    "llama3": rope_of("llama3", 8.0, high_freq_factor=8.0, base=500.0),
    # megatron's own llama3 (its hard-coded 1/4/8192): only the module's frequencies differ
    "llama3_megatron": rope_of("llama3", 8.0, 8192),
}


def hf_from_phoenix(model, rope: RopeConfig):
    """A ``LlamaForCausalLM`` with ``rope``'s parameters and ``model``'s weights."""
    from transformers import LlamaForCausalLM

    config = hf_config(rope, HEAD_DIM, hidden_size=HIDDEN, num_attention_heads=HEADS,
                       num_key_value_heads=GROUPS, num_hidden_layers=LAYERS,
                       intermediate_size=FFN, vocab_size=VOCAB, rms_norm_eps=1e-5,
                       tie_word_embeddings=False, attention_bias=False, mlp_bias=False)
    config._attn_implementation = "eager"
    hf = LlamaForCausalLM(config).float().eval()
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()
          if not k.endswith("_extra_state")}
    per_group = HEADS // GROUPS
    out = {"model.embed_tokens.weight": sd["embedding.word_embeddings.weight"],
           "model.norm.weight": sd["decoder.final_layernorm.weight"],
           "lm_head.weight": sd["output_layer.weight"]}
    for i in range(LAYERS):
        p, h = f"decoder.layers.{i}.", f"model.layers.{i}."
        # linear_qkv rows, per query group g: its q heads, then k_g, then v_g
        qkv = sd[p + "self_attention.linear_qkv.weight"].view(GROUPS, per_group + 2, HEAD_DIM, HIDDEN)
        out[h + "self_attn.q_proj.weight"] = qkv[:, :per_group].reshape(-1, HIDDEN)
        out[h + "self_attn.k_proj.weight"] = qkv[:, per_group].reshape(-1, HIDDEN)
        out[h + "self_attn.v_proj.weight"] = qkv[:, per_group + 1].reshape(-1, HIDDEN)
        out[h + "self_attn.o_proj.weight"] = sd[p + "self_attention.linear_proj.weight"]
        gate, up = sd[p + "mlp.linear_fc1.weight"].chunk(2)
        out[h + "mlp.gate_proj.weight"], out[h + "mlp.up_proj.weight"] = gate, up
        out[h + "mlp.down_proj.weight"] = sd[p + "mlp.linear_fc2.weight"]
        out[h + "input_layernorm.weight"] = sd[p + "input_layernorm.weight"]
        out[h + "post_attention_layernorm.weight"] = sd[p + "pre_mlp_layernorm.weight"]
    hf.load_state_dict(out, strict=True)
    return hf


def model_checks(out_dir: str) -> dict:
    """Runs in one spawned rank: build each case with phoenix's builder, compare."""
    from phoenix.model import build_model, install_rope
    from phoenix.model.rope import rope_module_inv_freq
    from phoenix.runtime import init_runtime
    from phoenix.testing.tiny import TinyData, tiny_config

    files = TinyData("/unused/tokenizer.model", {"web": "/unused/web", "code": "/unused/code"})
    layout, results = None, {}
    torch.manual_seed(0)
    tokens = torch.randint(0, VOCAB, (2, SEQ))
    positions = torch.arange(SEQ).expand(2, SEQ)
    for name, rope in MODEL_CASES.items():
        model_section = {"preset": "tiny", "num_layers": LAYERS, "max_seq_length": SEQ,
                         "init_method_std": 0.2, "rope": {**vars(rope)}}
        cfg = tiny_config(files, out_dir, model=model_section,
                          data={"seq_length": SEQ, "datasets": [{"prefix": "/unused/web"}]})
        layout = layout or init_runtime(cfg)
        torch.manual_seed(1)
        (model,) = build_model(cfg, layout, VOCAB, wrap_ddp=False)
        model.eval()
        with torch.no_grad():  # norms are ones at init: make them count
            for key, value in model.state_dict().items():
                if "layernorm" in key:
                    value.copy_(1 + 0.3 * torch.randn_like(value))
        hf = hf_from_phoenix(model, rope)
        ours = rope_module_inv_freq(model, SEQ)
        ref = inv_freq_and_scaling(rope, HEAD_DIM, SEQ)[0]
        with torch.no_grad():
            expected = hf(tokens).logits
            logits = model(tokens, positions, attention_mask=None)
            install_rope(model, RopeConfig(base=rope.base))  # the scaling dropped
            dropped = model(tokens, positions, attention_mask=None)
            install_rope(model, rope)  # and switched back
            again = model(tokens, positions, attention_mask=None)
        results[name] = dict(
            module=type(model.rotary_pos_emb).__name__,
            inv_freq_rel=((ours - ref).abs() / ref).max().item(),
            logits_abs=(logits - expected).abs().max().item(),
            dropped_abs=(dropped - expected).abs().max().item(),
            reinstalled_abs=(again - expected).abs().max().item(),
            logit_scale=expected.abs().max().item())
    return results


@pytest.fixture(scope="module")
def model_results(tmp_path_factory):
    from phoenix.testing.distributed import run_distributed

    (results,) = run_distributed(model_checks, 1, str(tmp_path_factory.mktemp("rope")))
    return results


EXPECTED_MODULE = {"none": "RotaryEmbedding", "linear": "RotaryEmbedding", "ntk": "RotaryEmbedding",
                   "dynamic_ntk": "ScaledRotaryEmbedding", "yarn": "YarnRotaryEmbedding",
                   "yarn_attention_factor": "YarnRotaryEmbedding",
                   "llama3": "ScaledRotaryEmbedding", "llama3_megatron": "RotaryEmbedding"}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(MODEL_CASES))
def test_model_matches_transformers_llama(model_results, name):
    r = model_results[name]
    print(name, r)
    assert r["module"] == EXPECTED_MODULE[name]
    assert r["inv_freq_rel"] <= FREQ_TOL            # what megatron's module really applies
    assert r["logits_abs"] <= LOGIT_TOL             # the whole model, at 4x the original context
    assert r["reinstalled_abs"] <= LOGIT_TOL        # install_rope switches back exactly
    if MODEL_CASES[name].scaling != "none" and name != "llama3_megatron":
        assert r["dropped_abs"] > 10 * LOGIT_TOL    # the comparison can fail


def document_checks(out_dir: str) -> dict:
    """One rank: dynamic NTK with documents packed in a sample (data.document_mask, dense
    mask) against transformers' dynamic RoPE on each document alone."""
    from phoenix.model import build_model
    from phoenix.model.attention_inputs import dense_document_mask, document_forward
    from phoenix.runtime import init_runtime
    from phoenix.testing.tiny import TinyData, tiny_config

    rope = MODEL_CASES["dynamic_ntk"]
    files = TinyData("/unused/tokenizer.model", {"web": "/unused/web", "code": "/unused/code"})
    cfg = tiny_config(files, out_dir, model={"preset": "tiny", "num_layers": LAYERS,
                                             "max_seq_length": SEQ, "init_method_std": 0.2,
                                             "rope": {**vars(rope)}},
                      data={"seq_length": SEQ, "datasets": [{"prefix": "/unused/web"}]})
    layout = init_runtime(cfg)
    torch.manual_seed(1)
    (model,) = build_model(cfg, layout, VOCAB, wrap_ddp=False)
    model.eval()
    hf = hf_from_phoenix(model, rope)
    # row 0: documents of 16 (= L: the original base), 36 and 12 tokens; row 1: one of 64.
    # (transformers caches a grown base until a sequence shorter than L: this order keeps
    # its oracle exact)
    lengths = [[16, 36, 12], [SEQ]]
    torch.manual_seed(2)
    tokens = torch.randint(0, VOCAB, (2, SEQ))
    segments = torch.tensor([sum(([i] * n for i, n in enumerate(row)), []) for row in lengths])
    positions = torch.tensor([sum((list(range(n)) for n in row), []) for row in lengths])
    with torch.no_grad():
        packed = document_forward(model, tokens, positions, segments)
        one_base = model(tokens, positions, attention_mask=dense_document_mask(segments))
        worst = worst_one_base = 0.0
        for r, row in enumerate(lengths):
            start = 0
            for n in row:
                alone = hf(tokens[r:r + 1, start:start + n]).logits[0]
                worst = max(worst, (packed[r, start:start + n] - alone).abs().max().item())
                worst_one_base = max(worst_one_base,
                                     (one_base[r, start:start + n] - alone).abs().max().item())
                start += n
    return {"packed_vs_alone": worst, "one_base_vs_alone": worst_one_base}


def test_dynamic_ntk_document_gets_the_base_of_its_own_length(tmp_path):
    """A document inside a packed sample gets the logits of the document alone under
    transformers' dynamic RoPE (base from max(position_ids) + 1), not the packed length's."""
    from phoenix.testing.distributed import run_distributed

    (r,) = run_distributed(document_checks, 1, str(tmp_path))
    print(r)
    assert r["packed_vs_alone"] <= LOGIT_TOL
    assert r["one_base_vs_alone"] > 10 * LOGIT_TOL  # the packed length's base: the old fault


# ------------------------------------------------------------ (c) config errors


def _model(**rope_keys) -> dict:
    return {"num_layers": 2, "hidden_size": 64, "ffn_hidden_size": 176,
            "num_attention_heads": 4, "max_seq_length": 64, **rope_keys}


@pytest.mark.parametrize("rope,message", [
    ({"scaling": "linear", "factor": 0}, "model.rope.factor: must be > 0, got 0"),
    ({"scaling": "yarn", "factor": -2, "original_max_position_embeddings": 8},
     "model.rope.factor: must be > 0, got -2"),
    ({"scaling": "linear"}, "model.rope.factor: scaling 'linear' needs a factor"),
    ({"scaling": "ntk"}, "model.rope.factor: scaling 'ntk' needs a factor"),
    ({"scaling": "yarn", "factor": 4}, "model.rope.original_max_position_embeddings: scaling 'yarn'"),
    ({"scaling": "llama3", "factor": 8}, "model.rope.original_max_position_embeddings: scaling 'llama3'"),
    ({"scaling": "dynamic_ntk", "factor": 2},
     "model.rope.original_max_position_embeddings: scaling 'dynamic_ntk'"),
    ({"scaling": "llama3", "factor": 8, "original_max_position_embeddings": 8192,
      "low_freq_factor": 4, "high_freq_factor": 4}, "model.rope.high_freq_factor: must be > low"),
    ({"factor": 4}, "model.rope.factor: 4.0 has no effect with scaling 'none'"),
    ({"scaling": "dynamic_ntk+yarn", "factor": 2}, "model.rope.scaling: 'dynamic_ntk+yarn' is not one of"),
    ({"scaling": ["dynamic_ntk", "yarn"], "factor": 2}, "model.rope.scaling: ['dynamic_ntk', 'yarn'] "
                                                        "is not one of"),
    ({"scalling": "yarn"}, "unknown config key 'model.rope.scalling' (did you mean 'scaling'?)"),
])
def test_rope_config_errors_name_the_key(rope, message):
    from phoenix.config import ModelConfig

    with pytest.raises(ConfigError) as e:
        from_dict(ModelConfig, _model(rope=rope), "model")
    assert message in str(e.value) and "\n" not in str(e.value)
    if "scaling:" in message:
        assert "'llama3'" in str(e.value) and "'none'" in str(e.value)  # the allowed values


def test_rope_with_learned_absolute_positions_is_refused():
    from phoenix.config import ModelConfig

    with pytest.raises(ConfigError, match=r"^model.rope: set, but model.position_embedding is "
                                          r"learned_absolute"):
        from_dict(ModelConfig, _model(position_embedding="learned_absolute",
                                      rope={"base": 1e6}), "model")
    plain = from_dict(ModelConfig, _model(position_embedding="learned_absolute"), "model")
    assert plain.rope is None
    assert from_dict(ModelConfig, _model(), "model").rope == RopeConfig()


def test_rotary_base_is_renamed_and_saved_configs_upgrade(tmp_path):
    import yaml

    from phoenix.config import ModelConfig
    from phoenix.config.loader import load_saved_config

    with pytest.raises(ConfigError) as e:
        from_dict(ModelConfig, _model(rotary_base=500000), "model")
    assert str(e.value) == "config key 'model.rotary_base' was renamed to 'model.rope.base'"
    saved = {"output_dir": str(tmp_path), "model": _model(rotary_base=500000),
             "tokenizer": {"model": "t.model"}, "train": {"steps": 2, "global_batch_size": 2},
             "optim": {"lr": 1e-3}, "data": {"seq_length": 32, "datasets": [{"prefix": "x"}]}}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(saved))
    cfg = load_saved_config(tmp_path / "config.yaml")
    assert cfg.model.rope == RopeConfig(base=500000.0)


def test_covered_length():
    assert rope_of("yarn", 4.0, 4096).covered_length(8192) == 16384
    assert RopeConfig(scaling="linear", factor=2.0).covered_length(4096) == 8192
    assert RopeConfig(scaling="ntk", factor=8.0).covered_length(4096) == 4096
    assert RopeConfig(base=1e6).covered_length(4096) == 4096
    assert not math.isnan(rope_of("llama3", 8.0, 8192).covered_length(1))
