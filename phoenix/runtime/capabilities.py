"""What this machine's packages allow, checked against a config before any work.

``--dry-run`` and :func:`phoenix.runtime.init_runtime` both call
:func:`check_capabilities`, so everything a run would refuse for its device and the
installed packages is refused by the dry run too, with the key that asks for it.
The performance switches' ``auto`` values are resolved here too
(:func:`resolved_attention_backend`, :func:`resolved_fusions`): the builder, ``describe``
and the start-up log all read these answers.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import shutil

from phoenix.config import ConfigError, RunConfig


@functools.cache
def te_available() -> bool:
    """Whether Transformer Engine imports (its layer spec and fused kernels)."""
    try:
        import transformer_engine  # noqa: F401

        return True
    except Exception:
        return False


@functools.cache
def megatron_softmax_kernels_available() -> bool:
    """Whether megatron's fused scale-mask-softmax CUDA kernels import (built by
    Megatron-LM's or apex's C++ extensions; megatron-core's wheel does not ship them)."""
    import importlib.util

    return all(importlib.util.find_spec(m) is not None
               for m in ("scaled_masked_softmax_cuda", "scaled_upper_triang_masked_softmax_cuda"))


@functools.cache
def compiler_available(device: str) -> bool:
    """Whether ``torch.compile`` (megatron's ``jit_fuser``, which builds the SwiGLU and
    cross-entropy fusions) can generate kernels: Triton on CUDA, a C++ compiler on CPU."""
    if device == "cuda":
        return importlib.util.find_spec("triton") is not None
    return any(shutil.which(c) for c in (os.environ.get("CXX") or "g++", "c++", "clang++"))


def _te_on_cuda(cfg: RunConfig) -> bool:
    return cfg.runtime.device == "cuda" and te_available()


def _why_no_te(cfg: RunConfig) -> str:
    return ("runtime.device is cpu" if cfg.runtime.device != "cuda"
            else "Transformer Engine is not importable")


def resolved_attention_backend(cfg: RunConfig) -> str:
    """``te``, ``sdpa`` or ``unfused``: the core attention ``model.attention_backend``
    means on this device with these packages (``auto``: te with TE on CUDA, else sdpa on
    CUDA, else unfused)."""
    backend = cfg.model.attention_backend
    if backend != "auto":
        return backend
    if cfg.runtime.device == "cuda":
        return "te" if te_available() else "sdpa"
    return "unfused"


def _yarn_stages(cfg: RunConfig) -> list[str]:
    """Where a yarn rope is used: ``model.rope`` and every stage's ``rope``."""
    ropes = [("model.rope", cfg.model.rope)]
    ropes += [(f"stages[{i}].rope", s.rope) for i, s in enumerate(cfg.stages or [])]
    return [key for key, rope in ropes if rope is not None and rope.scaling == "yarn"]


def resolved_fusions(cfg: RunConfig) -> dict:
    """The fusions a run uses (``model.fusions`` with None resolved): ``bias_activation``,
    ``rope``, ``gradient_accumulation`` (bools) and ``cross_entropy`` (none / native / te).
    Call after :func:`check_capabilities`, which refuses what an explicit value cannot run."""
    f, device, te = cfg.model.fusions, cfg.runtime.device, _te_on_cuda(cfg)
    has_kernel = cfg.model.activation == "swiglu" or cfg.model.add_bias_linear
    auto = {
        "bias_activation": device == "cuda" and has_kernel and compiler_available(device),
        "rope": te and not _yarn_stages(cfg),
        "gradient_accumulation": te,
    }
    out = {k: auto[k] if getattr(f, k) is None else getattr(f, k) for k in auto}
    out["cross_entropy"] = f.cross_entropy
    return out


def check_capabilities(cfg: RunConfig) -> None:
    """Raise ConfigError naming the key when ``cfg`` needs what this setup lacks."""
    p = cfg.parallel
    # MoE under TP (which megatron trains only with SP) gets phoenix's SP-capable torch
    # norms on the local spec (phoenix.model.sequence_parallel); dense models keep the TE requirement.
    if p.sequence_parallel and cfg.model.moe is None and not (cfg.runtime.device == "cuda"
                                                             and te_available()):
        why = ("runtime.device is cpu" if cfg.runtime.device != "cuda"
               else "Transformer Engine is not importable")
        raise ConfigError(
            f"parallel.sequence_parallel: needs the Transformer Engine layer spec on CUDA "
            f"({why}; megatron-core's local spec has no sequence-parallel LayerNorm/RMSNorm); "
            f"set parallel.sequence_parallel=false")

    if p.context > 1:
        _check_context_parallel(cfg)
    if cfg.model.moe is not None:
        _check_moe(cfg)
    _check_attention(cfg)
    _check_fusions(cfg)
    _check_fp8_and_tp_overlap(cfg)
    _check_recompute(cfg)


def _check_recompute(cfg: RunConfig) -> None:
    """megatron-core 0.16.1 recomputes ``layernorm`` (and ``moe_act``) with
    ``CheckpointWithoutOutput()``, whose ``self.fp8 = fp8 is not None`` is true for the
    default ``fp8=False``: its forward then calls Transformer Engine's
    ``FP8GlobalStateManager`` (a NameError without TE)."""
    rc = cfg.model.recompute
    if rc.granularity == "selective" and not _te_on_cuda(cfg):
        for name in ("layernorm", "moe_act"):
            if name in (rc.modules or []):
                raise ConfigError(
                    f"model.recompute.modules: {name} needs Transformer Engine on CUDA "
                    f"({_why_no_te(cfg)}; megatron-core 0.16.1's CheckpointWithoutOutput calls "
                    f"TE's fp8 state); use core_attn, mlp, moe or shared_experts")


def _check_moe(cfg: RunConfig) -> None:
    """MoE features that exist only as Transformer Engine / CUDA kernels (on CPU the
    experts run as megatron-core's SequentialMLP with the alltoall/allgather dispatcher)."""
    if cfg.runtime.device == "cuda" and te_available():
        return
    why = ("runtime.device is cpu" if cfg.runtime.device != "cuda"
           else "Transformer Engine is not importable")
    moe = cfg.model.moe
    needs_te = {
        "grouped_gemm": (moe.grouped_gemm, "grouped GEMM is Transformer Engine's TEGroupedMLP; "
                         "set model.moe.grouped_gemm=false (one GEMM per expert)"),
        "token_dispatcher": (moe.token_dispatcher == "flex", "the flex dispatcher runs DeepEP/"
                             "HybridEP kernels; use token_dispatcher alltoall"),
        "permute_fusion": (moe.permute_fusion, "fused permutation is a Transformer Engine "
                           "kernel; set model.moe.permute_fusion=false"),
    }
    for key, (asked, what) in needs_te.items():
        if asked:
            raise ConfigError(f"model.moe.{key}: needs CUDA with Transformer Engine ({why}); {what}")


def _check_context_parallel(cfg: RunConfig) -> None:
    """Context parallelism runs only in Transformer Engine's attention (megatron-core's
    local DotProductAttention asserts context_parallel_size == 1)."""
    cp = cfg.parallel.context
    if not (cfg.runtime.device == "cuda" and te_available()):
        why = ("runtime.device is cpu" if cfg.runtime.device != "cuda"
               else "Transformer Engine is not importable")
        raise ConfigError(f"parallel.context: context parallelism needs Transformer Engine "
                          f"attention on CUDA ({why}); set parallel.context=1")
    if cfg.data.document_mask:
        raise ConfigError("parallel.context: not supported together with data.document_mask yet "
                          "(THD sequences would need padding to 2*context per document)")
    if cfg.eval is not None:
        raise ConfigError("parallel.context: in-training eval does not split sequences over "
                          "context-parallel ranks yet; remove the eval section and run "
                          "`phoenix eval` at parallel.context=1")
    for stage in cfg.resolved.stages.stages:
        if stage.seq_length % (2 * cp):
            raise ConfigError(f"parallel.context: stage '{stage.name}' seq_length "
                              f"{stage.seq_length} is not divisible by 2*context = {2 * cp}")


def _check_attention(cfg: RunConfig) -> None:
    """``model.attention_backend`` against the device, TE and the features attention serves."""
    backend, asked = resolved_attention_backend(cfg), cfg.model.attention_backend
    key = "model.attention_backend"
    if backend == "te" and not _te_on_cuda(cfg):
        raise ConfigError(f"{key}: te needs Transformer Engine on CUDA ({_why_no_te(cfg)}); "
                          f"use sdpa, unfused or auto")
    if cfg.parallel.context > 1 and backend != "te":
        raise ConfigError(f"{key}: {backend}{' (auto)' if asked == 'auto' else ''} cannot split "
                          f"attention over context-parallel ranks (parallel.context="
                          f"{cfg.parallel.context}); only Transformer Engine's attention does: "
                          f"use attention_backend te, or parallel.context=1")
    if backend == "sdpa" and cfg.data.document_mask and _te_on_cuda(cfg):
        raise ConfigError(f"{key}: sdpa cannot read the packed THD sequences that "
                          f"data.document_mask uses with Transformer Engine; use "
                          f"attention_backend te (or auto)")


def _check_fusions(cfg: RunConfig) -> None:
    """An explicit ``model.fusions`` value this setup cannot run (None never fails)."""
    f, device = cfg.model.fusions, cfg.runtime.device
    compiler = ("Triton" if device == "cuda" else "a C++ compiler (g++, or $CXX)")
    if f.bias_activation:
        if cfg.model.activation == "gelu" and not cfg.model.add_bias_linear:
            raise ConfigError("model.fusions.bias_activation: megatron has no fused GeLU without "
                              "biases (model.add_bias_linear is false); set it to false or null")
        if not compiler_available(device):
            raise ConfigError(f"model.fusions.bias_activation: megatron compiles it with "
                              f"torch.compile, which needs {compiler} here; set it to false")
    if f.cross_entropy == "native":
        if cfg.train.precision != "bf16":
            raise ConfigError(
                f"model.fusions.cross_entropy: native returns the logits gradient in bf16 "
                f"(megatron-core 0.16.1), which would round {cfg.train.precision} training's "
                f"gradients; use it with train.precision bf16 (on CUDA), or set it to none")
        if not compiler_available(device):
            raise ConfigError(f"model.fusions.cross_entropy: native is compiled with "
                              f"torch.compile, which needs {compiler} here; set it to none")
    needs_te = {"cross_entropy": f.cross_entropy == "te", "rope": bool(f.rope),
                "gradient_accumulation": bool(f.gradient_accumulation)}
    for name, asked in needs_te.items():
        if asked and not _te_on_cuda(cfg):
            off = "none" if name == "cross_entropy" else "false"
            raise ConfigError(f"model.fusions.{name}: needs Transformer Engine on CUDA "
                              f"({_why_no_te(cfg)}); set it to {off}")
    if f.rope and (yarn := _yarn_stages(cfg)):
        raise ConfigError(f"model.fusions.rope: Transformer Engine's fused RoPE cannot apply "
                          f"YaRN's attention factor ({', '.join(yarn)} use yarn; megatron would "
                          f"drop it for packed sequences); set it to false or null")


def _check_fp8_and_tp_overlap(cfg: RunConfig) -> None:
    """fp8 and TP communication overlap exist only in Transformer Engine."""
    if cfg.train.fp8 is not None and not _te_on_cuda(cfg):
        raise ConfigError(f"train.fp8: fp8 GEMMs are Transformer Engine's ({_why_no_te(cfg)}); "
                          f"remove train.fp8")
    if not cfg.parallel.tp_comm_overlap:
        return
    if not _te_on_cuda(cfg):
        raise ConfigError(f"parallel.tp_comm_overlap: needs Transformer Engine's userbuffers on "
                          f"CUDA ({_why_no_te(cfg)}); set it to false")
    lengths = sorted({s.seq_length for s in cfg.resolved.stages.stages})
    if len(lengths) > 1:
        raise ConfigError(f"parallel.tp_comm_overlap: the userbuffers are sized once for "
                          f"seq_length x micro_batch_size, but the stages use seq_length "
                          f"{lengths}; set it to false")
    ev = cfg.eval
    if ev is not None and (ev.needle is not None or ev.micro_batch_size not in
                           (None, cfg.train.micro_batch_size)):
        raise ConfigError("parallel.tp_comm_overlap: eval must use the training micro-batch "
                          "shape (no eval.micro_batch_size of its own, no eval.needle); "
                          "evaluate checkpoints with `phoenix eval` instead")
