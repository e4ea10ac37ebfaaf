"""Build megatron-core ``GPTModel`` chunks (wrapped in DDP) from phoenix configs.

Llama-style defaults (RMSNorm, SwiGLU, RoPE, GQA, untied embeddings, no biases) come
from :class:`phoenix.config.ModelConfig`. The Transformer Engine layer spec is used when
TE is importable on a CUDA run; otherwise megatron-core's local spec. The choice is
logged once at start-up, never made silently.
"""

from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F

from phoenix.config import RunConfig
from phoenix.model.rope import gpt_rope_kwargs, install_rope, needs_phoenix_module, set_yarn_config
from phoenix.runtime import ParallelLayout
from phoenix.runtime.capabilities import te_available

log = logging.getLogger(__name__)


def padded_vocab_size(vocab_size: int, divisible_by: int, tp_size: int) -> int:
    """Embedding rows: the vocab padded to a multiple of ``divisible_by`` and of TP.

    Padding to ``divisible_by`` first (and to TP only if that is not already a multiple)
    keeps the padded size independent of TP for the usual ``divisible_by`` = 128, so a
    checkpoint reshards between TP layouts.
    """
    multiple = divisible_by if divisible_by % tp_size == 0 else math.lcm(divisible_by, tp_size)
    return int(math.ceil(vocab_size / multiple) * multiple)


def params_dtype(precision: str) -> torch.dtype:
    """Parameter dtype of ``train.precision`` (fp32 / bf16 / fp16)."""
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def transformer_config(cfg: RunConfig, layout: ParallelLayout):
    """megatron-core ``TransformerConfig`` for this run and layout."""
    from megatron.core.transformer import TransformerConfig

    m, on_cpu = cfg.model, layout.device.type == "cpu"
    dtype = params_dtype(cfg.train.precision)
    return TransformerConfig(
        num_layers=m.num_layers,
        hidden_size=m.hidden_size,
        ffn_hidden_size=m.ffn_hidden_size,
        num_attention_heads=m.num_attention_heads,
        num_query_groups=m.num_query_groups,
        normalization=m.normalization,
        layernorm_epsilon=m.norm_epsilon,
        gated_linear_unit=m.activation == "swiglu",
        activation_func=F.silu if m.activation == "swiglu" else F.gelu,
        add_bias_linear=m.add_bias_linear,
        add_qkv_bias=m.add_qkv_bias,
        qk_layernorm=m.qk_layernorm,
        init_method_std=m.init_method_std,
        attention_dropout=m.attention_dropout,
        hidden_dropout=m.hidden_dropout,
        tensor_model_parallel_size=layout.tp_size,
        pipeline_model_parallel_size=layout.pp_size,
        context_parallel_size=cfg.parallel.context,
        sequence_parallel=cfg.parallel.sequence_parallel,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        # Per-token loss: the loss and gradients are exact token means over the whole
        # global batch, whatever the DP size or micro-batch split.
        calculate_per_token_loss=True,
        # CPU initialisation builds each full weight and slices it, so the initial
        # weights are the same at every TP size. It is the only choice on the CPU backend.
        use_cpu_initialization=on_cpu,
        # Fused kernels need CUDA (and apex/TE); the CPU path uses the unfused torch ops.
        bias_activation_fusion=not on_cpu and m.add_bias_linear,
        # The fused causal softmax ignores a given mask: document masking (a dense
        # block-diagonal mask on the local spec) needs the unfused one.
        masked_softmax_fusion=not on_cpu and not cfg.data.document_mask,
        bias_dropout_fusion=not on_cpu,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
        persist_layer_norm=False,
    )


def uses_te_spec(layout: ParallelLayout) -> bool:
    """True when the model is built with the Transformer Engine layer spec (CUDA + TE)."""
    return layout.device.type == "cuda" and te_available()


def layer_spec(cfg: RunConfig, layout: ParallelLayout):
    from megatron.core.models.gpt.gpt_layer_specs import (
        get_gpt_layer_local_spec,
        get_gpt_layer_with_transformer_engine_spec,
    )

    if uses_te_spec(layout):
        log.info("model: Transformer Engine layer spec")
        return get_gpt_layer_with_transformer_engine_spec(qk_layernorm=cfg.model.qk_layernorm)
    if layout.device.type == "cuda":
        log.warning("model: Transformer Engine is not importable; using megatron-core's local "
                    "layer spec (slower on GPU: no fused kernels, no fp8)")
    return get_gpt_layer_local_spec(qk_layernorm=cfg.model.qk_layernorm,
                                    normalization=cfg.model.normalization)


def build_model(cfg: RunConfig, layout: ParallelLayout, vocab_size: int, wrap_ddp: bool = True,
                initialize: bool = True, dtype: torch.dtype | None = None):
    """Build this rank's model chunk(s): a list (one chunk; virtual PP is not used yet).

    For checkpoint conversion: ``initialize=False`` leaves the weights uninitialised
    (``torch.empty``) when every one is overwritten next; ``dtype`` overrides the
    parameter dtype of ``train.precision`` (e.g. bf16 weights on the cpu device)."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.models.gpt import GPTModel

    tconfig = transformer_config(cfg, layout)
    tconfig.perform_initialization = initialize
    if dtype is not None:
        tconfig.params_dtype = dtype
    rope = cfg.model.rope if cfg.model.position_embedding == "rope" else None
    set_yarn_config(tconfig, rope)  # YaRN's settings live on the config (GPTModel, attention)
    padded = padded_vocab_size(vocab_size, cfg.model.make_vocab_size_divisible_by, layout.tp_size)
    model = GPTModel(
        config=tconfig,
        transformer_layer_spec=layer_spec(cfg, layout),
        vocab_size=padded,
        max_sequence_length=cfg.model.max_seq_length,
        pre_process=layout.is_first_stage,
        post_process=layout.is_last_stage,
        share_embeddings_and_output_weights=cfg.model.tie_embeddings,
        pg_collection=layout.pg_collection,
        **gpt_rope_kwargs(rope, tconfig.kv_channels),
    )
    if needs_phoenix_module(rope):  # a scaling megatron-core lacks (phoenix.model.rope)
        install_rope(model, rope)
    model.phoenix_rope = rope
    model.to(layout.device)
    if not wrap_ddp:
        return [model]
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=False,
        use_distributed_optimizer=cfg.parallel.use_distributed_optimizer,
    )
    ddp = DistributedDataParallel(config=tconfig, ddp_config=ddp_config, module=model,
                                  pg_collection=layout.pg_collection)
    return [ddp]
