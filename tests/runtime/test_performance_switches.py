"""The performance switches (model.attention_backend, model.fusions, train.fp8,
parallel.tp_comm_overlap): what ``auto`` resolves to per device and packages, the
one-line refusal of whatever this setup cannot run (the same call --dry-run makes), and
the megatron fields they set."""

from types import SimpleNamespace

import pytest
import torch

from phoenix.config import ConfigError, build_config
from phoenix.model import builder
from phoenix.runtime import capabilities as caps

from tests.config.test_config import base


def _cfg(*overrides, device="cpu", **sections):
    return build_config(base(runtime={"device": device}, **sections), list(overrides))


@pytest.fixture
def te(monkeypatch):
    """Pretend Transformer Engine imports (CUDA configs are only checked, never built)."""
    monkeypatch.setattr(caps, "te_available", lambda: True)
    monkeypatch.setattr(builder, "te_available", lambda: True)


@pytest.mark.parametrize("device,has_te,asked,expected", [
    ("cpu", False, "auto", "unfused"),     # CPU keeps megatron's numerics
    ("cuda", False, "auto", "sdpa"),       # CUDA without TE: torch's flash / mem-efficient
    ("cuda", True, "auto", "te"),
    ("cpu", False, "sdpa", "sdpa"),
    ("cuda", True, "unfused", "unfused"),
])
def test_auto_attention_backend(monkeypatch, device, has_te, asked, expected):
    monkeypatch.setattr(caps, "te_available", lambda: has_te)
    cfg = _cfg(f"model.attention_backend={asked}", device=device)
    caps.check_capabilities(cfg)
    assert caps.resolved_attention_backend(cfg) == expected


def test_auto_fusions_follow_megatron_lm_where_they_can_run(monkeypatch):
    assert caps.resolved_fusions(_cfg()) == {"bias_activation": False, "rope": False,
                                             "gradient_accumulation": False,
                                             "cross_entropy": "none"}
    monkeypatch.setattr(caps, "te_available", lambda: True)
    monkeypatch.setattr(caps, "compiler_available", lambda device: True)
    assert caps.resolved_fusions(_cfg(device="cuda")) == {
        "bias_activation": True, "rope": True, "gradient_accumulation": True,
        "cross_entropy": "none"}
    yarn = _cfg("model.rope={scaling: yarn, factor: 4, original_max_position_embeddings: 64}",
                device="cuda")
    assert caps.resolved_fusions(yarn)["rope"] is False  # TE's kernel has no YaRN mscale
    gelu = _cfg("model.activation=gelu", device="cuda")
    assert caps.resolved_fusions(gelu)["bias_activation"] is False  # no kernel without bias


@pytest.mark.parametrize("overrides,device,line", [
    (["model.attention_backend=te"], "cuda",
     "model.attention_backend: te needs Transformer Engine on CUDA (Transformer Engine is not "
     "importable); use sdpa, unfused or auto"),
    (["model.fusions.cross_entropy=native"], "cpu",
     "model.fusions.cross_entropy: native returns the logits gradient in bf16 (megatron-core "
     "0.16.1), which would round fp32 training's gradients"),
    (["model.fusions.cross_entropy=native", "train.precision=fp16"], "cuda",
     "which would round fp16 training's gradients"),
    (["model.fusions.cross_entropy=te"], "cpu",
     "model.fusions.cross_entropy: needs Transformer Engine on CUDA (runtime.device is cpu); "
     "set it to none"),
    (["model.fusions.rope=true"], "cpu",
     "model.fusions.rope: needs Transformer Engine on CUDA (runtime.device is cpu); set it to "
     "false"),
    (["model.fusions.gradient_accumulation=true"], "cuda",
     "model.fusions.gradient_accumulation: needs Transformer Engine on CUDA (Transformer Engine "
     "is not importable); set it to false"),
    (["model.fusions.bias_activation=true", "model.activation=gelu"], "cpu",
     "model.fusions.bias_activation: megatron has no fused GeLU without biases"),
    (["train.fp8={recipe: tensorwise}"], "cuda",
     "train.fp8: fp8 GEMMs are Transformer Engine's (Transformer Engine is not importable); "
     "remove train.fp8"),
    (["model.preset=tiny_moe", "parallel.tensor=2", "parallel.sequence_parallel=true",
      "parallel.tp_comm_overlap=true"],  # MoE: SP runs on the local spec too
     "cpu", "parallel.tp_comm_overlap: needs Transformer Engine's userbuffers on CUDA "
            "(runtime.device is cpu); set it to false"),
])
def test_refused_with_one_line_naming_the_key(overrides, device, line):
    with pytest.raises(ConfigError) as e:
        caps.check_capabilities(_cfg(*overrides, device=device))
    assert line in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_no_compiler_refuses_the_compiled_fusions(monkeypatch):
    monkeypatch.setattr(caps, "compiler_available", lambda device: False)
    with pytest.raises(ConfigError, match=r"^model\.fusions\.bias_activation: megatron compiles "
                                          r"it with torch\.compile, which needs a C\+\+ compiler"):
        caps.check_capabilities(_cfg("model.fusions.bias_activation=true"))
    # auto never fails: it resolves to off
    assert caps.resolved_fusions(_cfg(device="cuda"))["bias_activation"] is False


@pytest.mark.parametrize("overrides,line", [
    (["parallel.context=2", "model.attention_backend=sdpa"],
     "model.attention_backend: sdpa cannot split attention over context-parallel ranks"),
    (["parallel.context=2", "model.attention_backend=unfused"],
     "model.attention_backend: unfused cannot split attention over context-parallel ranks"),
    (["data.document_mask=true", "model.attention_backend=sdpa"],
     "model.attention_backend: sdpa cannot read the packed THD sequences"),
    (["model.fusions.rope=true",
      "model.rope={scaling: yarn, factor: 4, original_max_position_embeddings: 64}"],
     "model.fusions.rope: Transformer Engine's fused RoPE cannot apply YaRN's attention factor "
     "(model.rope use yarn"),
    (["parallel.tensor=2", "parallel.sequence_parallel=true", "parallel.tp_comm_overlap=true",
      "stages=[{steps: 5, mixture: {web: 1}}, {steps: 5, mixture: {web: 1}, seq_length: 128}]"],
     "parallel.tp_comm_overlap: the userbuffers are sized once for seq_length x "
     "micro_batch_size, but the stages use seq_length [64, 128]"),
])
def test_refused_with_transformer_engine(te, overrides, line):
    with pytest.raises(ConfigError) as e:
        caps.check_capabilities(_cfg(*overrides, device="cuda"))
    assert line in str(e.value), str(e.value)


def test_tp_comm_overlap_needs_sequence_parallel():
    with pytest.raises(ConfigError, match=r"parallel\.tp_comm_overlap: needs "
                                          r"parallel\.sequence_parallel"):
        _cfg("parallel.tensor=2", "parallel.tp_comm_overlap=true")


def _layout(device: str, tp: int = 1):
    return SimpleNamespace(device=torch.device(device), tp_size=tp, pp_size=1, ep_size=1,
                           etp_size=1)


def test_megatron_fields_with_transformer_engine(te):
    """On CUDA with TE: fp8, TP overlap, the wgrad fusion and the attention backend reach
    megatron's TransformerConfig (apply_rope_fusion is left out: megatron's own check
    imports TE's kernel when the config is built)."""
    from megatron.core.transformer.enums import AttnBackend

    cfg = _cfg("train.fp8={format: e4m3, recipe: tensorwise, amax_history_len: 16, "
               "amax_compute_algo: max}", "parallel.tensor=2", "parallel.sequence_parallel=true",
               "parallel.tp_comm_overlap=true", "model.fusions.rope=false",
               "model.fusions.bias_activation=false", "model.attention_backend=unfused",
               device="cuda")
    caps.check_capabilities(cfg)
    tc = builder.transformer_config(cfg, _layout("cuda", tp=2))
    assert (tc.fp8, tc.fp8_recipe, tc.fp8_amax_history_len, tc.fp8_amax_compute_algo) == (
        "e4m3", "tensorwise", 16, "max")
    assert tc.tp_comm_overlap and tc.gradient_accumulation_fusion
    assert tc.attention_backend == AttnBackend.unfused  # TE's unfused attention
    assert not tc.apply_rope_fusion and not tc.bias_activation_fusion


def test_megatron_fields_on_cpu_keep_todays_numerics():
    """The CPU defaults: nothing fused, no fp8; an explicit SwiGLU fusion on CPU is set."""
    tc = builder.transformer_config(_cfg(), _layout("cpu"))
    assert not (tc.bias_activation_fusion or tc.cross_entropy_loss_fusion or tc.apply_rope_fusion
                or tc.gradient_accumulation_fusion or tc.tp_comm_overlap)
    assert tc.fp8 is None
    cfg = _cfg("model.fusions.bias_activation=true")
    caps.check_capabilities(cfg)
    assert builder.transformer_config(cfg, _layout("cpu")).bias_activation_fusion


@pytest.mark.parametrize("te_version,fp8", [("2.8", True), ("1.13", False)])
def test_tp_comm_overlap_userbuffers_shape(monkeypatch, te_version, fp8):
    """The userbuffers are sized as Megatron-LM's _initialize_tp_communicators sizes them,
    [seq_length x micro_batch_size / context, hidden], with its TE-version arguments
    (checked against a stand-in for TE's initialize_ub: TE is not installed here)."""
    import sys
    from enum import Enum

    import megatron.core.utils as mcore_utils

    from phoenix.runtime.tp_overlap import initialize_userbuffers

    calls = []
    base_mod = SimpleNamespace(initialize_ub=lambda **kw: calls.append(kw),
                               UserBufferQuantizationMode=Enum("Mode", "NONE FP8"))
    fake = SimpleNamespace(module=SimpleNamespace(base=base_mod))
    monkeypatch.setitem(sys.modules, "transformer_engine", SimpleNamespace(pytorch=fake))
    monkeypatch.setitem(sys.modules, "transformer_engine.pytorch", fake)
    monkeypatch.setattr(mcore_utils, "is_te_min_version",
                        lambda v: tuple(map(int, te_version.split("."))) >= tuple(
                            map(int, v.split(".")[:2])))
    extra = ["train.fp8={format: hybrid}"] if fp8 else []
    cfg = _cfg("parallel.tensor=2", "parallel.sequence_parallel=true",
               "parallel.tp_comm_overlap=true", "train.micro_batch_size=2", *extra,
               device="cuda")
    initialize_userbuffers(cfg)
    (kw,) = calls
    assert kw["shape"] == [64 * 2, 64] and kw["tp_size"] == 2
    assert kw["bootstrap_backend"] == "nccl"
    if te_version == "2.8":
        assert kw["quantization_modes"] == [base_mod.UserBufferQuantizationMode.FP8]
    else:
        assert kw["use_fp8"] is False and "quantization_modes" not in kw
