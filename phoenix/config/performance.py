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


RECOMPUTE_MODULES = ("core_attn", "layernorm", "mlp", "moe", "moe_act", "shared_experts")


@dataclass(kw_only=True)
class RecomputeConfig:
    """Activation recomputation (``model.recompute``; megatron ``recompute_*`` on
    ``TransformerConfig``): activations dropped in the forward and recomputed in the
    backward, trading compute for memory. It does not change the math (same losses and
    gradients), so a resume may change it (phoenix.checkpoint.resume_contract)."""

    granularity: Literal["none", "selective", "full"] = "none"
    """megatron ``recompute_granularity`` (Megatron-LM ``--recompute-granularity``; none =
    megatron's None). ``full``: a recomputed layer keeps only its input (about one more
    forward pass of those layers). ``selective``: only the ``modules`` below are
    recomputed (by default the core attention: its s x s scores and softmax, cheap to
    redo and the largest buffers without flash attention)."""
    method: Optional[Literal["uniform", "block"]] = None
    """megatron ``recompute_method`` (``--recompute-method``), full granularity only.
    ``uniform``: the layers of a pipeline stage are divided into chunks of ``num_layers``
    and only each chunk's input is kept; ``block``: the first ``num_layers`` layers of each
    pipeline stage are recomputed, the rest are not. None: uniform with full."""
    num_layers: Optional[int] = None
    """megatron ``recompute_num_layers`` (``--recompute-num-layers``), full granularity
    only: the chunk size (uniform) or the number of recomputed layers per pipeline stage
    (block); at most the layers per pipeline stage. None: 1 with full."""
    modules: Optional[list[str]] = None
    """megatron ``recompute_modules`` (``--recompute-modules``), selective granularity
    only: any of core_attn, layernorm (TE on CUDA), mlp, moe, moe_act (needs
    model.moe.grouped_gemm), shared_experts (needs shared experts). None: megatron's default, ``[core_attn]``."""

    def __post_init__(self):
        if self.granularity != "full":
            for key in ("method", "num_layers"):
                if getattr(self, key) is not None:
                    raise ConfigError(f"model.recompute.{key}: only with granularity full "
                                      f"(granularity is {self.granularity})")
        if self.granularity != "selective" and self.modules is not None:
            raise ConfigError(f"model.recompute.modules: only with granularity selective "
                              f"(granularity is {self.granularity})")
        if self.modules is not None:
            bad = [m for m in self.modules if m not in RECOMPUTE_MODULES]
            if bad or not self.modules:
                raise ConfigError(f"model.recompute.modules: {bad or 'empty'} not among "
                                  f"{list(RECOMPUTE_MODULES)}")
        if self.num_layers is not None and self.num_layers < 1:
            raise ConfigError(f"model.recompute.num_layers: must be >= 1, got {self.num_layers}")
        if self.granularity == "full":
            self.method = self.method or "uniform"
            self.num_layers = self.num_layers or 1

    def megatron_kwargs(self) -> dict:
        """The ``TransformerConfig`` fields this section sets."""
        if self.granularity == "none":
            return {}
        out = dict(recompute_granularity=self.granularity)
        if self.granularity == "full":
            out.update(recompute_method=self.method, recompute_num_layers=self.num_layers)
        else:
            out.update(recompute_modules=list(self.modules or ["core_attn"]))
        return out


def check_recompute(rc: RecomputeConfig, *, num_layers: int, pipeline: int, moe) -> None:
    """``model.recompute`` against the model and the pipeline layout (megatron's own
    ``TransformerConfig.__post_init__`` checks, refused earlier by key)."""
    if rc.granularity == "full" and pipeline and num_layers % pipeline == 0:
        per_stage = num_layers // pipeline
        if rc.num_layers > per_stage:
            raise ConfigError(f"model.recompute.num_layers: {rc.num_layers} exceeds the "
                              f"{per_stage} layers per pipeline stage")
    mods = rc.modules or []
    if "moe_act" in mods and (moe is None or not moe.grouped_gemm):
        raise ConfigError("model.recompute.modules: moe_act needs model.moe.grouped_gemm "
                          "(megatron recomputes the grouped experts' activation only)")
    for name in ("moe", "shared_experts"):
        if name in mods and moe is None:
            raise ConfigError(f"model.recompute.modules: {name} needs model.moe")
    if "shared_experts" in mods and moe.shared_expert_intermediate_size is None:
        raise ConfigError("model.recompute.modules: shared_experts needs "
                          "model.moe.shared_expert_intermediate_size")
