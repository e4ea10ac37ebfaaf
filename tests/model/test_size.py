"""Parameter counts against megatron-core's built GPTModel; the memory estimate and
``phoenix describe`` against numbers worked out by hand."""

import json
import subprocess
import sys
from pathlib import Path


from phoenix.config import build_config
from phoenix.model.size import Layout, memory_estimate, parameter_count
from phoenix.testing.distributed import run_distributed

from tests.config.test_config import base

ROOT = Path(__file__).resolve().parents[2]
VARIANTS = {
    "tiny": {},
    "layernorm_gelu_bias_tied_qknorm": {"normalization": "LayerNorm", "activation": "gelu",
                                        "add_bias_linear": True, "tie_embeddings": True,
                                        "qk_layernorm": True},
    "learned_absolute_mha": {"position_embedding": "learned_absolute", "num_query_groups": None},
    "moe": {"preset": "tiny_moe"},
    "moe_shared_gated_interleaved": {
        "preset": "tiny_moe",
        "moe": {"num_experts": 4, "router_topk": 1, "router_pre_softmax": True,
                "ffn_hidden_size": 32, "shared_expert_intermediate_size": 48,
                "shared_expert_gate": True, "layer_freq": [1, 0, 0, 1]}},
}


def _model_cfg(**model):
    return build_config(base(model={"preset": "tiny", **model})).model


def test_tiny_by_hand():
    # L=4, h=64, 4 heads of d=16, 2 query groups, SwiGLU ffn 176, RMSNorm, vocab 512, untied.
    # Per layer: qkv 64*(64+2*32) = 8192, proj 64*64 = 4096, norms 2*64, fc1 64*2*176 = 22528,
    # fc2 176*64 = 11264 -> 46208; x4 = 184832; + embedding and output 2*512*64, final norm 64.
    count = parameter_count(_model_cfg(), 512)
    assert count.total == 184832 + 2 * 32768 + 64 == 250432
    assert count.active == count.total and count.experts == 0


def test_moe_by_hand():
    # tiny_moe: 4 layers, each with 4 experts of width 64 (top-2) and a 4 x 64 router:
    # per layer attention 12288 + norms 128 + router 256 + experts 4 * (64*128 + 64*64).
    count = parameter_count(_model_cfg(preset="tiny_moe"), 512)
    expert = 64 * 128 + 64 * 64
    assert count.experts == 4 * 4 * expert
    assert count.total == 4 * (12288 + 128 + 256 + 4 * expert) + 2 * 32768 + 64
    assert count.active == count.total - 4 * 2 * expert  # 2 of 4 experts unused per layer


def _built_numel(out_dir):
    from phoenix.model import build_model
    from phoenix.runtime import init_runtime
    from phoenix.testing.tiny import TinyData, tiny_config

    files = TinyData("/unused/tokenizer.model", {"web": "/unused/web", "code": "/unused/code"})
    configs = {name: tiny_config(files, out_dir, model={"preset": "tiny", **model})
               for name, model in VARIANTS.items()}
    layout = init_runtime(configs["tiny"])  # one process: the same layout for every variant
    return {name: sum(p.numel() for p in build_model(cfg, layout, 500, wrap_ddp=False)[0].parameters())
            for name, cfg in configs.items()}


def test_counts_equal_the_built_model(tmp_path):
    numel = run_distributed(_built_numel, 1, str(tmp_path))[0]
    for name, model in VARIANTS.items():
        # 500 tokens pad to 512 (make_vocab_size_divisible_by 64 in the tiny preset).
        assert parameter_count(_model_cfg(**model), 512).total == numel[name], name


def test_memory_by_hand():
    layout = Layout(tensor=2, pipeline=2, data=2, precision="bf16", micro_batch_size=1,
                    num_micro_batches=4, seq_length=64, attention="unfused")
    mem = memory_estimate(_model_cfg(), 512, layout)
    # First stage (the most loaded: 2 micro-batches in flight): layers 0-1, each
    # (12288 + 33792) / TP 2 + 128 norms = 23168, + embedding 32768 / 2 -> 62720 params.
    assert mem.params == 62720
    assert (mem.weights, mem.gradients) == (2 * 62720, 4 * 62720)
    assert mem.optimizer == 12 * 62720 // 2 and mem.optimizer_not_distributed == 12 * 62720
    # Activations per layer (s=64, b=1, h=64, t=2, no SP): outside the TP region
    # 2*2sbh + 2sbh + 2sbh = 32768; inside: q,k,v 2*64*128 + proj input 2*64*64 + the
    # unfused softmax, fp32 + bf16 copy, 6*4*64*64 + MLP 2*64*352 + 2*64*176 = 190464,
    # / 2 -> 128000 per layer.
    assert mem.activations_per_micro_batch == 2 * 128000
    assert mem.activations == 2 * 2 * 128000 and mem.logits == 0
    assert mem.total == 125440 + 250880 + 376320 + 512000


def test_attention_memory_by_backend():
    """Per micro-batch on the first stage (2 layers of the tiny model, as above): flash
    keeps no s x s; the dense document mask adds its bool once, sdpa its shared additive
    bf16 mask and, under GQA, keys and values repeated to the 4 query heads."""
    def per_micro_batch(**kw):
        layout = Layout(tensor=2, pipeline=2, data=2, precision="bf16", micro_batch_size=1,
                        num_micro_batches=4, seq_length=64, **kw)
        return memory_estimate(_model_cfg(), 512, layout).activations_per_micro_batch

    flash = 2 * (32768 + (16384 + 8192 + 67584) // 2)
    assert per_micro_batch(attention="te") == per_micro_batch(attention="sdpa") == flash
    assert per_micro_batch(attention="te", dense_mask=True) == flash + 64 * 64
    repeated_kv = 2 * 64 * (2 * 2 * 16) // 2  # per layer: k and v 2 more heads of 16, / TP
    assert per_micro_batch(attention="sdpa", dense_mask=True) == (
        flash + 2 * repeated_kv + 3 * 64 * 64)
    assert per_micro_batch(attention="unfused", dense_mask=True) == 2 * 128000 + 64 * 64


def test_describe_cli_prints_and_json(tmp_path):
    cmd = [sys.executable, "-m", "phoenix.cli", "describe", "configs/recipes/long_context.yaml",
           "--world-size", "64", "--vocab-size", "32000"]
    text = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert text.returncode == 0, text.stderr
    assert "parameters: total 6.69 B | active per token 6.69 B" in text.stdout
    assert "64 GPUs = TP 8 x PP 1 x CP 1 x DP 8" in text.stdout
    data = json.loads(subprocess.run(cmd + ["--json"], cwd=ROOT, capture_output=True, text=True,
                                     timeout=120).stdout)
    mem = data["memory_bytes"]
    assert mem["total"] == sum(mem[k] for k in ("weights", "gradients", "optimizer",
                                                "activations", "logits"))
    bad = subprocess.run(cmd[:5] + ["--world-size", "12"], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert bad.returncode == 2 and "model.vocab_size: not set" in bad.stderr


def test_describe_follows_the_attention_backend():
    """describe reports the backend a run would use here and counts its memory: on CPU
    auto is megatron's unfused attention with its s x s softmax per head."""
    from phoenix.train.describe import describe, format_description

    def run(*overrides):
        cfg = build_config(base(runtime={"device": "cpu"}), list(overrides))
        return describe(cfg, 1, 500)

    unfused, sdpa = run(), run("model.attention_backend=sdpa")
    assert unfused["layout"]["attention"] == "unfused" and sdpa["layout"]["attention"] == "sdpa"
    s, b, heads, layers = 64, 2, 4, 4
    assert (unfused["memory_bytes"]["activations_per_micro_batch"]
            - sdpa["memory_bytes"]["activations_per_micro_batch"]) == 4 * heads * s * s * b * layers
    assert "fp32; attention unfused (auto: cpu)" in format_description(unfused)


def test_recompute_memory_by_hand():
    """Activations of the tiny model's 4 layers in one stage (128000 bytes per layer as
    in test_memory_by_hand, of which 6*4*64*64 / TP 2 = 49152 the unfused softmax):
    selective core_attn drops the softmax; full keeps each unit's input (2sbh = 8192, no
    SP) and rebuilds one unit in the backward, counted once."""
    def mem(**kw):
        layout = Layout(tensor=2, pipeline=1, data=2, precision="bf16", micro_batch_size=1,
                        num_micro_batches=4, seq_length=64, attention="unfused", **kw)
        return memory_estimate(_model_cfg(), 512, layout)

    assert mem().activations == 4 * 128000
    assert mem(recompute="selective").activations == 4 * (128000 - 49152)
    full = mem(recompute="full", recompute_method="uniform", recompute_num_layers=1)
    assert (full.activations_per_micro_batch, full.activations) == (4 * 8192,
                                                                    4 * 8192 + 128000)
    two = mem(recompute="full", recompute_method="uniform", recompute_num_layers=2)
    assert (two.activations_per_micro_batch, two.activations) == (2 * 8192,
                                                                  2 * 8192 + 2 * 128000)
    block = mem(recompute="full", recompute_method="block", recompute_num_layers=1)
    assert block.activations_per_micro_batch == 8192 + 3 * 128000
    assert block.activations == 8192 + 4 * 128000


def test_describe_follows_recompute():
    from phoenix.train.describe import describe, format_description

    def run(*overrides):
        cfg = build_config(base(runtime={"device": "cpu"}), list(overrides))
        return describe(cfg, 1, 500)

    none, sel = run(), run("model.recompute.granularity=selective")
    full = run("model.recompute.granularity=full")
    s, b, heads, layers = 64, 2, 4, 4
    assert (none["memory_bytes"]["activations_per_micro_batch"]
            - sel["memory_bytes"]["activations_per_micro_batch"]) == 4 * heads * s * s * b * layers
    assert full["memory_bytes"]["activations"] < sel["memory_bytes"]["activations"]
    assert "selective recompute core_attn)" in format_description(sel)
    assert "full recompute uniform 1;" in format_description(full)


def test_fit_verdict_names_the_smallest_change():
    """--gpu-memory: fits, else recompute first (selective before full), then TP / PP."""
    from phoenix.train.describe import GIB, describe, fit_verdict, format_fit

    def make(extra):
        return build_config(base(runtime={"device": "cpu"}), list(extra))

    def total(*extra):
        return describe(make(list(extra)), 2, 500)["memory_bytes"]["total"] / GIB

    none, sel = total(), total("model.recompute.granularity=selective")
    full = total("model.recompute.granularity=full")
    assert full < sel < none
    assert fit_verdict(make, 2, 500, none * 1.01)["fits"]
    v = fit_verdict(make, 2, 500, (none + sel) / 2)
    assert not v["fits"] and v["change"] == ["model.recompute.granularity=selective"]
    assert "smallest change that fits: model.recompute.granularity=selective" in format_fit(v)
    assert fit_verdict(make, 2, 500, (sel + full) / 2)["change"] == [
        "model.recompute.granularity=full"]
    v = fit_verdict(make, 2, 500, full * 0.999)
    assert v["change"] and v["change"][0].startswith("parallel."), v
