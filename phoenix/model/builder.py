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

from phoenix.config import RopeConfig, RunConfig
from phoenix.model.rope import install_rope
from phoenix.model.sequence_parallel import sequence_parallel_spec
from phoenix.model.vocab_mask import mask_padded_vocab
from phoenix.runtime import ParallelLayout
from phoenix.runtime.capabilities import (
    megatron_softmax_kernels_available,
    resolved_attention_backend,
    resolved_fusions,
    te_available,
)

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
    from megatron.core.transformer.enums import AttnBackend

    m, on_cpu = cfg.model, layout.device.type == "cpu"
    dtype = params_dtype(cfg.train.precision)
    fusions = resolved_fusions(cfg)
    # TE's attention picks flash or cuDNN fused itself (auto), or runs its unfused kernel;
    # the local spec ignores the field (sdpa swaps the core-attention module instead).
    te_unfused = uses_te_spec(layout) and resolved_attention_backend(cfg) == "unfused"
    fp8 = cfg.train.fp8
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
        # parallel.virtual_pipeline: the layer offsets of each chunk (vp_stage) follow it.
        virtual_pipeline_model_parallel_size=cfg.parallel.virtual_pipeline,
        # Interleaved 1F1B: Megatron-LM's default p2p (--overlap-p2p-communication): separate
        # isend/irecv, ordered by even/odd rank. With the batched ops (batch_p2p_comm) both
        # neighbours are one rank at PP=2, and a send to "previous" and one to "next" (a
        # gradient and an activation of one shape) are posted in an order the peer does
        # not receive them in: on gloo, PP=2 x VP=2's first grad norm was 2% off.
        overlap_p2p_comm=cfg.parallel.virtual_pipeline is not None,
        batch_p2p_comm=cfg.parallel.virtual_pipeline is None,
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
        attention_backend=AttnBackend.unfused if te_unfused else AttnBackend.auto,
        # model.fusions, resolved for this device and packages (runtime.capabilities).
        bias_activation_fusion=fusions["bias_activation"],
        cross_entropy_loss_fusion=fusions["cross_entropy"] != "none",
        cross_entropy_fusion_impl="te" if fusions["cross_entropy"] == "te" else "native",
        # The fused causal softmax ignores a given mask: document masking (a dense
        # block-diagonal mask on the local spec) needs the unfused one. megatron-core's
        # wheel has no softmax kernels: megatron would import them at the first forward.
        masked_softmax_fusion=(not on_cpu and not cfg.data.document_mask
                               and megatron_softmax_kernels_available()),
        bias_dropout_fusion=not on_cpu,
        apply_rope_fusion=fusions["rope"],
        gradient_accumulation_fusion=fusions["gradient_accumulation"],
        persist_layer_norm=False,
        # train.fp8 and parallel.tp_comm_overlap (Transformer Engine only: capabilities).
        fp8=fp8.format if fp8 is not None else None,
        fp8_recipe=fp8.recipe if fp8 is not None else "delayed",
        fp8_amax_history_len=fp8.amax_history_len if fp8 is not None else 1,
        fp8_amax_compute_algo=fp8.amax_compute_algo if fp8 is not None else "most_recent",
        tp_comm_overlap=cfg.parallel.tp_comm_overlap,
        # model.recompute: megatron recompute_granularity / _method / _num_layers / _modules.
        **m.recompute.megatron_kwargs(),
        **moe_kwargs(cfg),
    )


def moe_kwargs(cfg: RunConfig) -> dict:
    """``TransformerConfig`` fields of ``model.moe`` and the expert-parallel layout; empty
    for a dense model (so a dense config is exactly what it was before MoE existed)."""
    moe, p = cfg.model.moe, cfg.parallel
    if moe is None:
        return {}
    # With calculate_per_token_loss, megatron-core 0.16.1 scales each rank's aux and z
    # losses by its *local* token count (router.attach_and_log_load_balancing_loss), while
    # under sequence/context parallelism a TP x CP rank routes only 1/(TP*CP) of the
    # sequence: the router's summed gradient, hence the effective coefficients, would
    # shrink by TP*CP. Scaled back here, so a coefficient means the same at every layout
    # (tests/train/test_moe_layout_parity.py: TP=2 x EP=2 equals one process).
    split = p.tensor * p.context
    return dict(
        num_moe_experts=moe.num_experts,
        moe_router_topk=moe.router_topk,
        moe_layer_freq=moe.layer_freq,
        moe_ffn_hidden_size=moe.expert_ffn_hidden_size(cfg.model.ffn_hidden_size),
        moe_shared_expert_intermediate_size=moe.shared_expert_intermediate_size,
        moe_shared_expert_gate=moe.shared_expert_gate,
        moe_router_score_function=moe.router_score_function,
        moe_router_pre_softmax=moe.router_pre_softmax,
        moe_router_enable_expert_bias=moe.router_enable_expert_bias,
        moe_router_bias_update_rate=moe.router_bias_update_rate,
        moe_router_load_balancing_type=moe.aux_loss_type,
        moe_aux_loss_coeff=moe.aux_loss_coeff * split,
        moe_z_loss_coeff=None if moe.z_loss_coeff is None else moe.z_loss_coeff * split,
        moe_expert_capacity_factor=moe.capacity_factor,
        moe_pad_expert_input_to_capacity=moe.pad_expert_input_to_capacity,
        moe_token_drop_policy=moe.token_drop_policy,
        moe_token_dispatcher_type=moe.token_dispatcher,
        moe_grouped_gemm=moe.grouped_gemm,
        moe_router_dtype=moe.router_dtype,
        moe_permute_fusion=moe.permute_fusion,
        expert_model_parallel_size=p.expert,
        expert_tensor_parallel_size=p.expert_tensor if p.expert_tensor is not None else p.tensor,
    )


def uses_te_spec(layout: ParallelLayout) -> bool:
    """True when the model is built with the Transformer Engine layer spec (CUDA + TE)."""
    return layout.device.type == "cuda" and te_available()


def layer_spec(cfg: RunConfig, layout: ParallelLayout, tconfig=None, vp_stage: int | None = None,
               announce: bool = True):
    """The decoder spec of model chunk ``vp_stage`` (None: no virtual pipeline): one layer
    spec for a dense model; for MoE, megatron-core's block spec of the chunk's layers (MoE
    or dense per ``moe.layer_freq``; experts as SequentialMLP, or TEGroupedMLP with
    ``grouped_gemm`` on CUDA + TE). With ``model.attention_backend`` sdpa, its core
    attention is phoenix's SDPAttention. ``announce``: log the choices (once per build)."""
    attention = resolved_attention_backend(cfg)
    if announce:
        fusions = ", ".join(f"{k} {'on' if v is True else 'off' if v is False else v}"
                            for k, v in resolved_fusions(cfg).items())
        log.info("model: attention %s (model.attention_backend %s); fusions: %s", attention,
                 cfg.model.attention_backend, fusions)
    spec = _decoder_spec(cfg, layout, tconfig, vp_stage, announce)
    if attention == "sdpa":
        from phoenix.model.sdpa_attention import sdpa_spec

        spec = sdpa_spec(spec)
    return spec


def _decoder_spec(cfg: RunConfig, layout: ParallelLayout, tconfig, vp_stage, announce: bool):
    from megatron.core.models.gpt.gpt_layer_specs import (
        get_gpt_decoder_block_spec,
        get_gpt_layer_local_spec,
        get_gpt_layer_with_transformer_engine_spec,
    )

    say = log.info if announce else log.debug
    if cfg.model.moe is not None:
        te = uses_te_spec(layout)
        say("model: MoE, %s layer spec", "Transformer Engine" if te else "local")
        spec = get_gpt_decoder_block_spec(tconfig, use_transformer_engine=te,
                                          normalization=cfg.model.normalization,
                                          vp_stage=vp_stage, pp_rank=layout.pp_rank)
        if cfg.parallel.sequence_parallel and not te:  # torch norms marked for SP
            spec = sequence_parallel_spec(spec, tconfig, layout.pp_rank, vp_stage)
        return spec
    if uses_te_spec(layout):
        say("model: Transformer Engine layer spec")
        return get_gpt_layer_with_transformer_engine_spec(qk_layernorm=cfg.model.qk_layernorm)
    if layout.device.type == "cuda" and announce:
        log.warning("model: Transformer Engine is not importable; using megatron-core's local "
                    "layer spec (slower on GPU: no fused kernels, no fp8)")
    return get_gpt_layer_local_spec(qk_layernorm=cfg.model.qk_layernorm,
                                    normalization=cfg.model.normalization)


def build_model(cfg: RunConfig, layout: ParallelLayout, vocab_size: int, wrap_ddp: bool = True,
                initialize: bool = True, dtype: torch.dtype | None = None,
                rope: RopeConfig | None = None):
    """Build this rank's model chunks: a list of ``layout.vp_size`` chunks (one without a
    virtual pipeline), in megatron's order: chunk ``c`` of pipeline rank ``r`` holds the
    global layers of slice ``c * pp + r`` (:func:`chunk_layers`); only chunk 0 of the first
    rank has the embedding, only the last chunk of the last rank the output layer.

    ``rope``: the RoPE to build with, that of the step the model starts from (a stage's
    own ``rope``: ``cfg.resolved.stages.stage_at(step).rope``); default ``model.rope``.
    With learned absolute positions there is none (giving one is an error).

    For checkpoint conversion: ``initialize=False`` leaves the weights uninitialised
    (``torch.empty``) when every one is overwritten next; ``dtype`` overrides the
    parameter dtype of ``train.precision`` (e.g. bf16 weights on the cpu device)."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    if cfg.model.position_embedding != "rope":
        if rope is not None:
            raise ValueError(f"build_model: rope {rope.describe()} given for a model with "
                             f"{cfg.model.position_embedding} positions")
    elif rope is None:
        rope = cfg.model.rope
    tconfig = transformer_config(cfg, layout)
    tconfig.perform_initialization = initialize
    if dtype is not None:
        tconfig.params_dtype = dtype
    padded = padded_vocab_size(vocab_size, cfg.model.make_vocab_size_divisible_by, layout.tp_size)
    chunks = [_gpt_chunk(cfg, layout, tconfig, vocab_size, padded, rope, c)
              for c in range(layout.vp_size)]
    if not wrap_ddp:
        return chunks
    overlap_grad_reduce, overlap_param_gather = cfg.parallel.overlap(layout.device.type,
                                                                      layout.dp_size)
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=overlap_grad_reduce,
        overlap_param_gather=overlap_param_gather,
        align_param_gather=cfg.parallel.align_param_gather and overlap_param_gather,
        bucket_size=cfg.parallel.bucket_size,
        use_distributed_optimizer=cfg.parallel.use_distributed_optimizer,
    )
    # One DDP (own grad buffer) per chunk, as Megatron-LM wraps them; chunks after the
    # first keep one bucket each: their reduce already overlaps other chunks' backward.
    return [DistributedDataParallel(config=tconfig, ddp_config=ddp_config, module=chunk,
                                    disable_bucketing=c > 0, pg_collection=layout.pg_collection)
            for c, chunk in enumerate(chunks)]


def _gpt_chunk(cfg: RunConfig, layout: ParallelLayout, tconfig, vocab_size: int, padded: int,
               rope: RopeConfig | None, chunk: int):
    """Model chunk ``chunk`` (megatron's ``vp_stage``) of this rank: a ``GPTModel`` on
    ``layout.device`` with phoenix's RoPE and padded-vocabulary mask installed."""
    from megatron.core.models.gpt import GPTModel

    vp_stage = chunk if layout.vp_size > 1 else None
    model = GPTModel(
        config=tconfig,
        transformer_layer_spec=layer_spec(cfg, layout, tconfig, vp_stage, announce=chunk == 0),
        vocab_size=padded,
        max_sequence_length=cfg.model.max_seq_length,
        pre_process=layout.chunk_is_first(chunk),
        post_process=layout.chunk_is_last(chunk),
        share_embeddings_and_output_weights=cfg.model.tie_embeddings,
        pg_collection=layout.pg_collection,
        position_embedding_type="learned_absolute" if rope is None else "rope",
        vp_stage=vp_stage,
    )
    if rope is not None:  # the rotary module of phoenix.model.rope (GPTModel's is replaced)
        install_rope(model, rope)
    mask_padded_vocab(model, vocab_size, padded, layout.tp_rank)  # padded ids: logits -inf
    model.phoenix_rope = rope
    return model.to(layout.device)


def chunk_layers(num_layers: int, pp_size: int, vp_size: int, pp_rank: int,
                 chunk: int) -> range:
    """Global 0-based layers of model chunk ``chunk`` on pipeline rank ``pp_rank`` (megatron
    ``get_transformer_layer_offset`` for an even split): slice ``chunk * pp_size + pp_rank``
    of ``pp_size * vp_size`` equal slices."""
    per = num_layers // (pp_size * vp_size)
    start = (chunk * pp_size + pp_rank) * per
    return range(start, start + per)
