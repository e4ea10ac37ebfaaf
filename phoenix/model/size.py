"""Parameter counts and memory per GPU of a model and layout, from the config alone.

For planning a run before any hardware is touched (``phoenix describe``, ``--dry-run``).
The parameter counts are exact for megatron-core's ``GPTModel`` (the tests compare them
with a built model's ``numel``); the memory is an estimate with the conventions below.

**Parameters** of layer ``i``: its norms (``h`` each; ``2h`` for LayerNorm), attention
``h(n_q d + 2 n_kv d) + n_q d h`` (+ biases, + ``2d`` with qk_layernorm), and either a
dense MLP ``h·(2f or f) + f·h`` or, for a MoE layer, a router ``E·h``, ``E`` experts of
``moe_ffn_hidden_size`` and the shared experts. A token uses every parameter except the
routed experts it is not sent to: *active* = total − (E − top_k) experts per MoE layer.

**Memory** of the most loaded GPU (the first or last pipeline stage), in bytes:

* weights: 2 bytes per parameter in bf16/fp16, 4 in fp32; dense parameters are split
  over TP (norms are replicated, counted whole), experts over EP × expert-TP;
* gradients: 4 bytes per parameter (megatron's DDP buffer reduces in fp32);
* optimizer: Adam's two moments (8 bytes) plus the fp32 master copy (4 bytes) with
  bf16/fp16; the distributed optimizer divides it by the data-parallel size (experts:
  by the expert-data-parallel size ``TP·DP / (EP·ETP)``);
* activations of one micro-batch, per layer, after Korthikanti et al. 2022 ("Reducing
  Activation Recomputation in Large Transformer Models", arXiv 2205.05198, §4), without
  recomputation, written for GQA and SwiGLU: the inputs kept for the backward of the
  two norms (``2·2sbh``), QKV projection (``2sbh``), core attention (q, k, v:
  ``2sb(n_q d + 2 n_kv d)``), output projection (``2sb n_q d``), MLP (``2sbh`` +
  activation input ``2sb·2f`` + fc2 input ``2sbf``; MoE: per routed copy of a token,
  ``top_k`` copies, plus the shared experts). Terms inside the tensor-parallel region are
  divided by TP, the rest too with sequence parallelism. Dropout masks are left out
  (phoenix trains with 0). The core attention adds, by backend
  (``model.attention_backend`` as resolved for the run):

  - ``te`` (flash / cuDNN fused) and ``sdpa`` (torch's flash / memory-efficient
    kernels): no ``s²`` tensor, only the output and per-row softmax statistics;
  - ``unfused`` (megatron's DotProductAttention, or TE's unfused kernel): every head's
    softmax output, kept by the softmax backward in fp32 and by the ``probs @ V``
    backward in the 16-bit copy: ``6·a s² b`` with bf16/fp16 (``4·a s² b`` in fp32);
  - the dense document mask (``data.document_mask`` on the local spec): the bool
    ``[b, 1, s, s]`` mask once per micro-batch (``s² b``); ``sdpa`` adds, also once per
    micro-batch, the additive float mask every layer shares (``2 s² b``; ``4 s² b`` in
    fp32) and, per layer under GQA, keys and values repeated to the query heads (the
    masked kernel has no GQA).

  Activation recomputation (``model.recompute``, ``recompute`` below): ``full`` keeps
  only the input of each recomputed unit (``2sbh``, split by TP with sequence
  parallelism): ``uniform`` one per chunk of ``num_layers`` layers, ``block`` one per
  each of the first ``num_layers`` layers of a stage (the rest keep everything); the
  backward rebuilds one unit at a time, counted once (not per micro-batch in flight).
  ``selective`` drops what its modules recompute: ``core_attn`` the unfused ``s²``
  softmax buffers (flash / sdpa keep none), ``layernorm`` the norm outputs (the QKV and
  fc1 inputs), ``mlp`` / ``moe`` / ``shared_experts`` the MLP's inner activations (its
  activation and fc2 inputs), ``moe_act`` the experts' fc2 inputs.

  With 1F1B the first stage holds ``min(PP, micro-batches)`` micro-batches at once;
  interleaved (``virtual_pipeline`` VP chunks per rank, each rank holding every PP-th
  slice of layers) ``PP (1 + (PP-1)/(PP VP))`` of them (Megatron-LM's interleaved-schedule
  penalty; see :func:`_in_flight`);
* logits: the last stage's fp32 vocab-parallel logits, ``4 s b V / TP``.

Not counted: the CUDA context and allocator fragmentation (a few GiB), communication
buffers, and temporary tensors of a kernel.
"""

from __future__ import annotations

from dataclasses import dataclass

GiB = 1024 ** 3


# ------------------------------------------------------------------ parameters

def moe_layer_pattern(model_cfg) -> list[bool]:
    """Which layers have a MoE MLP (megatron's ``moe_layer_freq``: an int k means every
    k-th layer from layer 0, a list gives one 0/1 per layer); all False when dense."""
    moe = getattr(model_cfg, "moe", None)
    L = model_cfg.num_layers
    moe_layers = set(moe.moe_layers(L)) if moe is not None else set()
    return [i in moe_layers for i in range(L)]


@dataclass(frozen=True)
class LayerParams:
    attention: int
    """QKV and output projections (with biases and qk norms)."""
    norms: int
    """The layer's input and pre-MLP norms."""
    mlp: int
    """Dense MLP, or for a MoE layer the shared experts and the router."""
    experts: int
    """Routed experts (all of them; 0 for a dense layer)."""
    active_experts: int
    """Routed experts one token is sent to (``top_k`` of them)."""


def layer_params(model_cfg, moe_layer: bool) -> LayerParams:
    """Parameters of one transformer layer of ``model_cfg`` (a phoenix ModelConfig)."""
    m = model_cfg
    h, n_q = m.hidden_size, m.num_attention_heads
    n_kv = m.num_query_groups or n_q
    d = h // n_q
    norm = 2 * h if m.normalization == "LayerNorm" else h
    qkv = n_q * d + 2 * n_kv * d
    attention = h * qkv + n_q * d * h
    if m.add_bias_linear or getattr(m, "add_qkv_bias", False):
        attention += qkv
    if m.add_bias_linear:
        attention += h
    if m.qk_layernorm:
        attention += 2 * (2 * d if m.normalization == "LayerNorm" else d)

    def mlp_params(f: int) -> int:
        p = h * (2 * f if m.activation == "swiglu" else f) + f * h
        if m.add_bias_linear:
            p += (2 * f if m.activation == "swiglu" else f) + h
        return p

    if not moe_layer:
        return LayerParams(attention, 2 * norm, mlp_params(m.ffn_hidden_size), 0, 0)
    moe = m.moe
    expert = mlp_params(moe.ffn_hidden_size or m.ffn_hidden_size)
    shared = 0
    if moe.shared_expert_intermediate_size:
        shared = mlp_params(moe.shared_expert_intermediate_size)
        if moe.shared_expert_gate:
            shared += h
    router = moe.num_experts * h
    return LayerParams(attention, 2 * norm, shared + router, moe.num_experts * expert,
                       moe.router_topk * expert)


@dataclass(frozen=True)
class ParameterCount:
    """Parameters of a whole model (global, before any parallel split)."""

    embedding: int
    output: int
    """The output layer (0 when tied to the embedding)."""
    final_norm: int
    layers: tuple[LayerParams, ...]

    @property
    def experts(self) -> int:
        return sum(p.experts for p in self.layers)

    @property
    def total(self) -> int:
        return (self.embedding + self.output + self.final_norm
                + sum(p.attention + p.norms + p.mlp + p.experts for p in self.layers))

    @property
    def active(self) -> int:
        """Used by one token: the total minus the routed experts it is not sent to."""
        return self.total - sum(p.experts - p.active_experts for p in self.layers)


def parameter_count(model_cfg, padded_vocab: int) -> ParameterCount:
    """Exact parameter count of megatron-core's GPTModel built from ``model_cfg`` with
    ``padded_vocab`` embedding rows."""
    h = model_cfg.hidden_size
    learned = model_cfg.position_embedding == "learned_absolute"
    embedding = padded_vocab * h + (model_cfg.max_seq_length * h if learned else 0)
    output = 0 if model_cfg.tie_embeddings else padded_vocab * h
    final_norm = 2 * h if model_cfg.normalization == "LayerNorm" else h
    layers = tuple(layer_params(model_cfg, moe) for moe in moe_layer_pattern(model_cfg))
    return ParameterCount(embedding, output, final_norm, layers)


# ------------------------------------------------------------------ memory

@dataclass(frozen=True)
class Layout:
    """What the memory of one GPU depends on besides the model."""

    tensor: int = 1
    pipeline: int = 1
    virtual_pipeline: int = 1
    """Model chunks per pipeline rank (parallel.virtual_pipeline; 1: plain 1F1B)."""
    data: int = 1
    expert: int = 1
    expert_tensor: int | None = None
    """Expert tensor parallel size (None: = tensor)."""
    sequence_parallel: bool = False
    distributed_optimizer: bool = True
    precision: str = "bf16"
    micro_batch_size: int = 1
    num_micro_batches: int = 1
    seq_length: int = 2048
    attention: str = "te"
    """Core attention: ``te``, ``sdpa`` or ``unfused`` (see the module docstring)."""
    dense_mask: bool = False
    """The document mask as a dense ``[b, 1, s, s]`` bool (data.document_mask on the local
    spec; Transformer Engine packs the documents instead)."""
    recompute: str = "none"
    """``model.recompute.granularity``: none, selective or full."""
    recompute_method: str = "uniform"
    recompute_num_layers: int = 1
    recompute_modules: tuple = ("core_attn",)


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes on the most loaded GPU (see the module docstring for each term)."""

    params: int
    """Parameters held by that GPU (its pipeline stage's share after TP/EP)."""
    weights: int
    gradients: int
    optimizer: int
    optimizer_not_distributed: int
    """What the optimizer states would take without the distributed optimizer."""
    activations: int
    """All micro-batches in flight on that stage."""
    activations_per_micro_batch: int
    logits: int

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.optimizer + self.activations + self.logits


def _layer_activations(model_cfg, layout: Layout, moe_layer: bool) -> float:
    m, t = model_cfg, layout.tensor
    s, b, h = layout.seq_length, layout.micro_batch_size, m.hidden_size
    n_q = m.num_attention_heads
    n_kv = m.num_query_groups or n_q
    d = h // n_q
    sp = t if layout.sequence_parallel else 1  # split of the tensors outside the TP region
    glu = 2 if m.activation == "swiglu" else 1
    mods = layout.recompute_modules if layout.recompute == "selective" else ()
    outside = 2 * 2 * s * b * h  # 2 norm inputs
    if "layernorm" not in mods:
        outside += 2 * s * b * h + 2 * s * b * h  # QKV and fc1 inputs (the norm outputs)
    sdpa_masked = layout.attention == "sdpa" and layout.dense_mask
    kv_heads = n_q if sdpa_masked else n_kv  # the masked SDPA kernel gets k/v per query head
    inside = 2 * s * b * (n_q * d + 2 * kv_heads * d) + 2 * s * b * n_q * d
    fp32 = layout.precision == "fp32"
    if layout.attention == "unfused" and "core_attn" not in mods:
        # fp32 softmax output + its 16-bit copy, per head
        inside += (4 if fp32 else 6) * n_q * s * s * b
    if moe_layer:
        moe = m.moe
        f = moe.ffn_hidden_size or m.ffn_hidden_size
        if "moe" not in mods:
            inside += moe.router_topk * (2 * s * b * glu * f
                                         + (0 if "moe_act" in mods else 2 * s * b * f))
        if moe.shared_expert_intermediate_size and not {"moe", "shared_experts"} & set(mods):
            fs = moe.shared_expert_intermediate_size
            inside += 2 * s * b * glu * fs + 2 * s * b * fs
    else:
        f = m.ffn_hidden_size
        if "mlp" not in mods:
            inside += 2 * s * b * glu * f + 2 * s * b * f
    return outside / sp + inside / t


def _stage_activations(per_layer: list[float], layout: Layout,
                       hidden: int) -> tuple[float, float]:
    """(kept per micro-batch, transient peak of the backward's recomputation) of a
    stage's layers (``per_layer``: each layer's full activations) under full recompute."""
    if layout.recompute != "full":
        return sum(per_layer), 0.0
    sp = layout.tensor if layout.sequence_parallel else 1
    unit_input = 2 * layout.seq_length * layout.micro_batch_size * hidden / sp
    n = layout.recompute_num_layers
    if layout.recompute_method == "block":
        kept = n * unit_input + sum(per_layer[n:])
        return kept, max(per_layer[:n], default=0.0)
    chunks = [per_layer[i:i + n] for i in range(0, len(per_layer), n)]
    return len(chunks) * unit_input, max((sum(c) for c in chunks), default=0.0)


def _in_flight(pp: int, vp: int, rank: int, micro_batches: int) -> float:
    """Micro-batches whose activations pipeline rank ``rank`` holds at its peak, in whole
    stage's worth (a chunk's forward keeps 1/vp of the stage's layers), from megatron-core
    0.16.1's warm-up counts (``get_pp_rank_microbatches``): ``pp - rank`` forwards
    (1F1B), or ``2 (pp - rank - 1) + (vp - 1) pp + 1`` chunk forwards (interleaved; at
    rank 0 that is ``pp (1 + (pp-1)/(pp vp))``, Megatron-LM's "interleaved schedule
    memory penalty"); never more than the step's ``micro_batches``."""
    if vp == 1:
        return min(pp - rank, micro_batches)
    chunk_forwards = 2 * (pp - rank - 1) + (vp - 1) * pp + 1
    return min(chunk_forwards, micro_batches * vp) / vp


def memory_estimate(model_cfg, padded_vocab: int, layout: Layout) -> MemoryEstimate:
    """Memory of the most loaded GPU of ``layout`` training ``model_cfg``."""
    count = parameter_count(model_cfg, padded_vocab)
    pattern = moe_layer_pattern(model_cfg)
    t, pp, ep = layout.tensor, layout.pipeline, layout.expert
    etp = layout.expert_tensor or t
    per_stage = model_cfg.num_layers // pp
    bytes_per_param = 4 if layout.precision == "fp32" else 2
    optim_bytes = 8 if layout.precision == "fp32" else 12
    expert_dp = max(t * layout.data // (ep * etp), 1)

    vp = layout.virtual_pipeline

    def stage(first: bool, last: bool) -> tuple[float, float, float]:
        """(dense params, expert params, activation bytes of one micro-batch)."""
        # Under a virtual pipeline, pipeline rank r holds slices c * pp + r of pp * vp.
        per_chunk = per_stage // vp
        rank = 0 if first else pp - 1
        layers = [(c * pp + rank) * per_chunk + i for c in range(vp) for i in range(per_chunk)]
        dense = sum((count.layers[i].attention + count.layers[i].mlp) / t
                    + count.layers[i].norms for i in layers)
        experts = sum(count.layers[i].experts for i in layers) / (ep * etp)
        if first:
            dense += count.embedding / t
        if last:
            dense += count.final_norm + (count.output or (count.embedding if pp > 1 else 0)) / t
        # Full recompute counts its units per model chunk (each chunk is its own block).
        per_layer = [_layer_activations(model_cfg, layout, pattern[i]) for i in layers]
        parts = [_stage_activations(per_layer[c * per_chunk:(c + 1) * per_chunk], layout,
                                    model_cfg.hidden_size) for c in range(vp)]
        acts, peak = sum(kept for kept, _ in parts), max(p for _, p in parts)
        if layout.dense_mask:  # per micro-batch, shared by the layers: the bool mask and
            # sdpa's additive float mask
            additive = 0 if layout.attention != "sdpa" else 4 if layout.precision == "fp32" else 2
            acts += (1 + additive) * layout.seq_length ** 2 * layout.micro_batch_size
        return dense, experts, acts, peak

    # (first stage, last stage, micro-batches in flight): 1F1B fills the first stage most.
    m = layout.num_micro_batches
    candidates = [(True, pp == 1, _in_flight(pp, vp, 0, m))]
    if pp > 1:
        candidates.append((False, True, _in_flight(pp, vp, pp - 1, m)))
    best = None
    for first, last, in_flight in candidates:
        dense, experts, acts, peak = stage(first, last)
        logits = 4 * layout.seq_length * layout.micro_batch_size * padded_vocab / t if last else 0
        params = dense + experts
        optimizer_full = optim_bytes * params
        optimizer = (optim_bytes * (dense / layout.data + experts / expert_dp)
                     if layout.distributed_optimizer else optimizer_full)
        estimate = MemoryEstimate(
            params=int(params), weights=int(bytes_per_param * params), gradients=int(4 * params),
            optimizer=int(optimizer), optimizer_not_distributed=int(optimizer_full),
            activations=int(acts * in_flight + peak), activations_per_micro_batch=int(acts),
            logits=int(logits))
        if best is None or estimate.total > best.total:
            best = estimate
    return best
