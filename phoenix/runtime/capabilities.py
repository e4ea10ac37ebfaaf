"""What this machine's packages allow, checked against a config before any work.

``--dry-run`` and :func:`phoenix.runtime.init_runtime` both call
:func:`check_capabilities`, so everything a run would refuse for its device and the
installed packages is refused by the dry run too, with the key that asks for it.
"""

from __future__ import annotations

import functools

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
