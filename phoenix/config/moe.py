"""Typed config of mixture-of-experts MLPs: ``model.moe`` (None: a dense model).

Each field maps to the megatron-core ``TransformerConfig`` field named in its docstring
(``moe_*``, see megatron/core/transformer/transformer_config.py of megatron-core 0.16.1);
phoenix.model.builder does the mapping. Shapes use ``E`` experts, top-``k`` routing,
``h`` = model.hidden_size and ``f`` = the expert FFN width (:attr:`MoEConfig.ffn_hidden_size`).

Checks that need only this section live in ``__post_init__``; those that relate it to
the model and the parallel layout are :func:`check_moe_model` and :func:`check_moe_layout`
(called by ModelConfig and RunConfig). Expert parallelism itself is ``parallel.expert``
(EP) and ``parallel.expert_tensor`` (ETP).

A leaf module: it imports nothing of phoenix but the typed-config helpers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Optional, Union

from phoenix.config.typed import ConfigError


@dataclass(frozen=True, kw_only=True)
class MoEConfig:
    """Routed experts (and optionally shared experts) in place of the dense MLP."""

    num_experts: int
    """``E``, routed experts per MoE layer (megatron ``num_moe_experts``). Divisible by
    ``parallel.expert``: each EP rank holds ``E / EP`` whole experts."""
    router_topk: int = 2
    """``k``, experts each token is sent to (``moe_router_topk``; 1 <= k <= E). Top-2 as in
    GShard and Mixtral; fine-grained MoEs route to more (DeepSeek-MoE: 6 of 64)."""
    layer_freq: Union[int, list[int]] = 1
    """Which layers are MoE (``moe_layer_freq``): an int ``N`` makes layer ``i`` (0-based)
    MoE when ``i % N == 0`` (1: every layer), a list of 0/1 of length model.num_layers
    gives the pattern (1 = MoE, 0 = dense MLP of model.ffn_hidden_size), e.g.
    DeepSeek-MoE's dense first layer ``[0, 1, 1, ...]``."""
    ffn_hidden_size: Optional[int] = None
    """``f``, hidden width of each routed expert (``moe_ffn_hidden_size``; fc1 is 2f wide
    for SwiGLU). None: model.ffn_hidden_size. Fine-grained experts (arXiv 2401.06066)
    split the dense width, e.g. f = ffn_hidden_size / 4 with 4x the experts and top-k."""
    shared_expert_intermediate_size: Optional[int] = None
    """Total hidden width of the always-active shared experts
    (``moe_shared_expert_intermediate_size`` = number of shared experts x width of one),
    run on every token next to the routed ones. None: no shared expert. Split over
    parallel.tensor like a dense MLP, so it must divide by it."""
    shared_expert_gate: bool = False
    """Scale the shared experts' output by ``sigmoid(x · w_gate)``, ``w_gate`` [1, h]
    (``moe_shared_expert_gate``, Qwen2-MoE style). Needs shared_expert_intermediate_size."""
    router_score_function: Literal["softmax", "sigmoid"] = "softmax"
    """Router scores from the [tokens, E] logits (``moe_router_score_function``):
    ``softmax`` (Mixtral, DeepSeek-V2) or ``sigmoid`` (DeepSeek-V3, needed by
    router_enable_expert_bias)."""
    router_pre_softmax: bool = False
    """Apply the score function over all E logits before the top-k
    (``moe_router_pre_softmax``; the selected weights then sum to < 1) instead of
    softmax over the k selected logits. Required with router_topk 1 and softmax, whose
    softmax over a single logit would be constant (zero router gradient)."""
    router_enable_expert_bias: bool = False
    """Aux-loss-free load balancing (arXiv 2408.15664, DeepSeek-V3;
    ``moe_router_enable_expert_bias``): a per-expert bias [E], added to the scores for the
    top-k choice only, is moved after every step towards equal load. Sigmoid scores only."""
    router_bias_update_rate: float = 1e-3
    """Step size of the expert-bias update per optimizer step
    (``moe_router_bias_update_rate``; 1e-3 as in DeepSeek-V3)."""
    aux_loss_type: Literal["aux_loss", "seq_aux_loss", "global_aux_loss", "none"] = "aux_loss"
    """Load-balancing loss (``moe_router_load_balancing_type``): ``aux_loss`` over each
    micro-batch (GShard/Switch: ``E · sum_i f_i · P_i``), ``seq_aux_loss`` per sequence
    (DeepSeek-V2/V3), ``global_aux_loss`` over the global batch, ``none``."""
    aux_loss_coeff: float = 1e-2
    """Weight of the load-balancing loss (``moe_aux_loss_coeff``). megatron's default is
    0.0, i.e. no balancing at all, which lets a router collapse onto a few experts; 1e-2 is
    the starting value megatron's own docstring recommends (Switch Transformer used 1e-2,
    GShard/Mixtral 1e-2–1e-3). Set 0 with router_enable_expert_bias for aux-loss-free
    balancing. The aux loss adds gradients only: 1_train/loss reports the LM loss alone."""
    z_loss_coeff: Optional[float] = None
    """Router z-loss weight (ST-MoE, arXiv 2202.08906; ``moe_z_loss_coeff``): penalises
    large router logits; 1e-3 is the usual value. None: off."""
    capacity_factor: Optional[float] = None
    """Token dropping (``moe_expert_capacity_factor``): each expert takes at most
    ``capacity_factor · tokens · k / E`` tokens per micro-batch, the rest are dropped
    (they pass through the residual only). None: dropless (every token reaches its k
    experts)."""
    pad_expert_input_to_capacity: bool = False
    """Pad every expert's input to its capacity (``moe_pad_expert_input_to_capacity``):
    static shapes, no host sync, more FLOPs. Needs capacity_factor."""
    token_drop_policy: Literal["probs", "position"] = "probs"
    """With capacity_factor: drop the lowest-probability tokens (``probs``) or the last
    ones in the micro-batch (``position``) (``moe_token_drop_policy``)."""
    token_dispatcher: Literal["alltoall", "allgather", "flex"] = "alltoall"
    """How tokens reach the experts' EP ranks (``moe_token_dispatcher_type``): ``alltoall``
    (Megatron-LM's recommendation with expert parallelism; megatron-core's field default is
    ``allgather``), ``allgather``, or ``flex`` (DeepEP/HybridEP kernels: CUDA + TE only)."""
    grouped_gemm: bool = False
    """Run a rank's local experts as one grouped GEMM (``moe_grouped_gemm``, TE's
    TEGroupedMLP) instead of one GEMM per expert (SequentialMLP). CUDA + TE only."""
    router_dtype: Optional[Literal["fp32", "fp64"]] = "fp32"
    """Precision of the router's logits, softmax/top-k and the weighted sum of the expert
    outputs (``moe_router_dtype``). fp32 (default here; megatron's None keeps bf16) is
    recommended for stability with many experts. None: the training dtype."""
    permute_fusion: bool = False
    """Fused token permute/unpermute kernels in the dispatcher (``moe_permute_fusion``;
    Transformer Engine >= 2.1). CUDA + TE only."""

    def __post_init__(self):
        # Messages name keys relative to this section; from_dict prefixes "model.moe.".
        for name in ("num_experts", "ffn_hidden_size", "shared_expert_intermediate_size",
                     "capacity_factor", "router_bias_update_rate"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and value > 0):
                raise ConfigError(f"{name}: must be > 0, got {value}")
        if not 1 <= self.router_topk <= self.num_experts:
            raise ConfigError(f"router_topk: must be in [1, num_experts={self.num_experts}], "
                              f"got {self.router_topk}")
        if self.router_topk == 1 and self.router_score_function == "softmax" \
                and not self.router_pre_softmax:
            raise ConfigError("router_topk: 1 with softmax scores needs "
                              "model.moe.router_pre_softmax=true (a softmax over one selected logit is "
                              "constant, so the router would get no gradient)")
        freq = self.layer_freq
        if isinstance(freq, int) and freq < 1:
            raise ConfigError(f"layer_freq: must be >= 1 or a list of 0/1, got {freq}")
        if isinstance(freq, list) and (any(v not in (0, 1) for v in freq) or 1 not in freq):
            raise ConfigError(f"layer_freq: a list must hold only 0 (dense) and 1 (MoE) and "
                              f"at least one 1, got {freq}")
        if self.shared_expert_gate and self.shared_expert_intermediate_size is None:
            raise ConfigError("shared_expert_gate: needs model.moe.shared_expert_intermediate_size "
                              "(there is no shared expert to gate)")
        if self.router_enable_expert_bias and self.router_score_function != "sigmoid":
            raise ConfigError("router_enable_expert_bias: needs "
                              "model.moe.router_score_function=sigmoid (megatron-core supports the "
                              "expert bias only with sigmoid scores)")
        for name in ("aux_loss_coeff", "z_loss_coeff"):
            value = getattr(self, name)
            if value is not None and not value >= 0:
                raise ConfigError(f"{name}: must be >= 0, got {value}")
        if self.pad_expert_input_to_capacity and self.capacity_factor is None:
            raise ConfigError("pad_expert_input_to_capacity: needs model.moe.capacity_factor "
                              "(a dropless MoE has no capacity to pad to)")

    def expert_ffn_hidden_size(self, dense_ffn_hidden_size: int) -> int:
        """``f``: :attr:`ffn_hidden_size`, or the model's dense width when it is None."""
        return self.ffn_hidden_size or dense_ffn_hidden_size

    def moe_layers(self, num_layers: int) -> list[int]:
        """0-based indices of the MoE layers (megatron's rule for ``moe_layer_freq``)."""
        if isinstance(self.layer_freq, int):
            return [i for i in range(num_layers) if i % self.layer_freq == 0]
        return [i for i, v in enumerate(self.layer_freq) if v == 1]


def check_moe_model(moe: MoEConfig, num_layers: int) -> None:
    """``model.moe`` against the rest of ``model`` (no layout needed)."""
    if isinstance(moe.layer_freq, list) and len(moe.layer_freq) != num_layers:
        raise ConfigError(f"moe.layer_freq: the list has {len(moe.layer_freq)} entries, "
                          f"model.num_layers is {num_layers}")


def expert_tensor_size(tensor: int, expert_tensor: Optional[int]) -> int:
    """ETP: ``parallel.expert_tensor``, or ``parallel.tensor`` when it is None (megatron)."""
    return tensor if expert_tensor is None else expert_tensor


def check_moe_layout(moe: Optional[MoEConfig], *, dense_ffn_hidden_size: int,
                     add_bias_linear: bool, tensor: int, pipeline: int, expert: int, expert_tensor: Optional[int], sequence_parallel: bool,
                     world_size: Optional[int] = None) -> None:
    """MoE against the parallel layout; ``world_size`` None checks what does not need it.

    The expert-parallel rule is megatron-core 0.16.1's ``initialize_model_parallel``: the
    expert grid is ETP x EP x expert-DP x PP over the same world, so ``ETP * EP * PP`` must
    divide the world size, and (pipeline groups being shared) ``ETP * EP`` must divide
    ``world / PP = TP * CP * DP``. EP may thus span TP ranks (ETP=1, EP=TP) as well as DP
    ranks; it is not required to divide DP alone.
    """
    etp = expert_tensor_size(tensor, expert_tensor)
    if moe is None:
        if expert > 1:
            raise ConfigError(f"parallel.expert: {expert} needs a MoE model (set model.moe)")
        if expert_tensor not in (None, tensor):
            raise ConfigError("parallel.expert_tensor: needs a MoE model (set model.moe)")
        return
    if moe.num_experts % expert:
        raise ConfigError(f"parallel.expert: model.moe.num_experts {moe.num_experts} is not "
                          f"divisible by expert parallel size {expert}")
    f = moe.expert_ffn_hidden_size(dense_ffn_hidden_size)
    if f % etp:
        raise ConfigError(f"parallel.expert_tensor: the expert ffn_hidden_size {f} is not "
                          f"divisible by expert tensor parallel size {etp}")
    shared = moe.shared_expert_intermediate_size
    if shared is not None and shared % tensor:
        raise ConfigError(f"model.moe.shared_expert_intermediate_size: {shared} is not divisible "
                          f"by tensor parallel size {tensor}")
    if add_bias_linear and etp > 1:
        raise ConfigError("model.add_bias_linear: megatron-core supports biases in MoE experts "
                          "only with parallel.expert_tensor=1")
    if tensor > 1 and not sequence_parallel:
        raise ConfigError("parallel.sequence_parallel: MoE with parallel.tensor > 1 needs "
                          "sequence parallelism (megatron-core refuses to train MoE layers on "
                          "TP ranks that hold the same tokens)")
    if world_size is None:
        return
    if (world_size // pipeline) % (etp * expert):  # world % PP == 0 is checked before
        raise ConfigError(
            f"parallel.expert: expert_tensor*expert = {etp}*{expert} must divide world size / "
            f"pipeline = {world_size}/{pipeline} (= tensor*context*data parallel); megatron "
            f"lays experts out over the same ranks as the dense layers")
