"""Performance switches of megatron-core: kernel fusions (``model.fusions``) and fp8
(``train.fp8``). The attention backend is ``model.attention_backend`` and the
communication overlaps are in ``parallel`` (phoenix.config.parallel).

Each field names the megatron-core 0.16.1 field it sets (``TransformerConfig`` /
``ModelParallelConfig``); phoenix.model.builder maps them, and
phoenix.runtime.capabilities resolves the ``None`` (auto) values for the device and the
installed packages and refuses, with one line naming the key, whatever this setup cannot
run — the dry run too. Nothing is dropped silently. None of them changes what is trained
beyond floating-point rounding (fp8 aside, which rounds more), so a resume may change
them (phoenix.checkpoint.resume_contract).

A leaf module: it imports nothing of phoenix but the typed-config helpers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

from phoenix.config.typed import ConfigError

@dataclass(kw_only=True)
class FusionsConfig:
    """Fused kernels (``model.fusions``); None = Megatron-LM's default where this setup
    can run it (phoenix.runtime.capabilities.resolved_fusions), logged at start-up."""

    bias_activation: Optional[bool] = None
    """Fuse the MLP's bias add and activation: SwiGLU with or without biases, or bias-GeLU
    (megatron ``bias_activation_fusion``; Megatron-LM ``--bias-swiglu-fusion`` /
    ``--bias-gelu-fusion``, both on by default). megatron compiles the kernel with
    ``torch.compile`` (its ``jit_fuser``): Triton on CUDA, a C++ compiler on CPU. None: on
    for CUDA, off on CPU (no compile time; the eager ops it replaces give the same numbers
    to 1e-6). GeLU without biases has no fused kernel in megatron: refused."""
    cross_entropy: Literal["none", "native", "te"] = "none"
    """Fused cross-entropy over the vocab-parallel logits (megatron
    ``cross_entropy_loss_fusion`` and ``cross_entropy_fusion_impl``; Megatron-LM
    ``--cross-entropy-loss-fusion``, off by default, ``--cross-entropy-fusion-impl``).
    ``native``: megatron's torch.compile'd kernels, no Transformer Engine needed; its
    backward hands back the logits gradient in bf16 (megatron-core 0.16.1
    ``fused_cross_entropy.calculate_gradients``), so it is refused unless
    ``train.precision`` is bf16 (always on CPU, which trains in fp32). ``te``:
    Transformer Engine's kernel (CUDA with TE). ``none``: megatron's unfused
    ``vocab_parallel_cross_entropy``."""
    rope: Optional[bool] = None
    """Transformer Engine's fused RoPE kernel (megatron ``apply_rope_fusion``; Megatron-LM
    on by default, ``--no-rope-fusion``). Phoenix's RoPE scalings change only the
    frequencies, which the kernel takes as given; YaRN's attention factor (mscale on
    cos/sin) it cannot apply: megatron then falls back to the unfused RoPE with a warning
    (bshd) or drops the factor (packed THD sequences of ``data.document_mask``), so any
    ``yarn`` rope (model or stage) is refused with it. None: on with Transformer Engine
    on CUDA and no yarn rope; off otherwise."""
    gradient_accumulation: Optional[bool] = None
    """Weight-gradient GEMMs accumulate straight into megatron DDP's fp32 ``main_grad``
    (megatron ``gradient_accumulation_fusion``; Megatron-LM on by default,
    ``--no-gradient-accumulation-fusion``). Transformer Engine's linears do it
    (``fuse_wgrad_accumulation``); the local spec would need apex's
    ``fused_weight_gradient_mlp_cuda``, which phoenix does not use, so it needs CUDA with
    TE. None: on with TE on CUDA."""


@dataclass(kw_only=True)
class Fp8Config:
    """fp8 GEMMs through Transformer Engine (``train.fp8``; megatron ``fp8*`` fields).
    Wired, refused without TE on CUDA, **not yet run** on a GPU by phoenix."""

    format: Literal["hybrid", "e4m3"] = "hybrid"
    """megatron ``fp8`` (Megatron-LM ``--fp8-format``): ``hybrid`` = e4m3 activations and
    weights, e5m2 gradients (the usual choice); ``e4m3`` everywhere."""
    recipe: Literal["delayed", "tensorwise", "mxfp8", "blockwise"] = "delayed"
    """megatron ``fp8_recipe`` (``--fp8-recipe``, default delayed): ``delayed`` scales from
    an amax history; ``tensorwise`` per-tensor current scaling; ``mxfp8`` block scaling
    (Blackwell only); ``blockwise`` (Hopper, TE >= 2.3)."""
    amax_history_len: int = 1
    """megatron ``fp8_amax_history_len`` (``--fp8-amax-history-len``, default 1; NVIDIA's
    recipes use 1024): amax values kept per tensor (delayed scaling)."""
    amax_compute_algo: Literal["most_recent", "max"] = "most_recent"
    """megatron ``fp8_amax_compute_algo`` (``--fp8-amax-compute-algo``, default
    most_recent): the amax a scale is computed from, the newest or the history's largest."""

    def __post_init__(self):
        if self.amax_history_len < 1:
            raise ConfigError(f"train.fp8.amax_history_len: must be >= 1, got "
                              f"{self.amax_history_len}")
