"""Throughput, model FLOPs utilisation and memory in TensorBoard.

:func:`model_flops_per_token` counts the matrix-multiply FLOPs of one training token
from the architecture. Convention (PaLM appendix B / Megatron-LM's
``num_floating_point_operations``):

* 2 FLOPs per multiply-accumulate; only matrix multiplies are counted (norms, RoPE,
  softmax, activations, the embedding lookup and the optimizer are left out);
* forward + backward = 3 x forward (the backward computes gradients of both the
  activations and the weights);
* attention scores ``Q K^T`` and ``softmax(.) V`` are counted over the **full**
  ``seq_length x seq_length`` square (non-causal), as PaLM and Megatron-LM do, so the
  numbers compare with published MFU; ``causal=True`` halves that term instead;
* per layer and token: q/k/v projections ``h x (n_q d + 2 n_kv d)`` (grouped-query
  attention with ``n_kv = num_query_groups``), output projection ``n_q d x h``, MLP
  ``3 h f`` (SwiGLU: gate, up, down) or ``2 h f`` (GeLU); plus the logits ``h x V``
  once per token (pass the *padded* vocabulary: that is the matrix multiplied).
* MoE (``model.moe``): in each MoE layer (``layer_freq``) only the active parameters
  count, ``top_k`` experts of ``moe.ffn_hidden_size`` each, the shared experts and the
  ``h x num_experts`` router.

In closed form (forward, per token)::

    2 L [h (n_q d + 2 n_kv d) + n_q d h + m h f] + 2 L (2 s n_q d) [x 1/2 if causal] + 2 h V

:class:`ThroughputMonitor` records, on the logging rank and into the step's metrics
collector (written by the TensorBoard sink), every ``interval`` steps (and the last
step):

``3_throughput/tokens_per_sec_per_gpu``
    ``1_train/``'s loss-bearing tokens per second (as ``3_throughput/tokens_per_sec``,
    which the TensorBoard logger writes) divided by the world size.
``3_throughput/forward_backward_time``, ``3_throughput/optimizer_time``
    Seconds of this step on the logging rank (``StepMetrics``' times).
``3_throughput/logging_time``
    Seconds the callbacks of the *previous* step took (not written at a process's
    first step, which has no previous one).
``3_throughput/tflops_per_gpu``
    ``3 x forward FLOPs per token x global_batch_size x seq_length / step_time /
    world_size`` (every position of every sample is computed, masked or not).
``3_throughput/mfu``
    ``tflops_per_gpu / peak_tflops``: against the configured peak, else a default for
    the GPU (:data:`PEAK_TFLOPS`, bf16/fp16 dense); not written when neither is known
    (e.g. on CPU without a configured peak).
``memory/allocated_gb``, ``memory/reserved_gb``, ``memory/max_allocated_gb``
    CUDA only: ``torch.cuda`` memory statistics in GiB, the maximum over all ranks (the
    rank closest to running out); ``max_allocated`` is the peak since the process
    started.

``3_throughput/tokens_per_sec``, ``3_throughput/step_time`` and ``3_throughput/data_time``
are recorded by :class:`~phoenix.monitor.train_scalars.TrainScalars`, not here.
On logging steps with CUDA the monitor does one 3-element ``all_reduce(MAX)`` over the
world, so every rank must have it; it does nothing else outside the logging rank.
"""

from __future__ import annotations

import logging

import torch
import torch.distributed as dist

from phoenix.monitor.base import Callback, StepMetrics
from phoenix.monitor.tags import THROUGHPUT

log = logging.getLogger(__name__)

# Dense bf16/fp16 tensor-core peak (TFLOP/s, no sparsity) by a substring of
# torch.cuda.get_device_name(); the first match wins, so specific names come first.
PEAK_TFLOPS: tuple[tuple[str, float], ...] = (
    ("GH200", 989.0),
    ("H200", 989.0),
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),   # SXM
    ("H800", 989.0),
    ("H20", 148.0),
    ("B200", 2250.0),
    ("B100", 1750.0),
    ("A100", 312.0),
    ("A800", 312.0),
    ("L40S", 362.0),
    ("MI300X", 1307.0),
)

GIB = 1024 ** 3


def model_flops_per_token(model_cfg, seq_length: int, vocab_size: int, *, causal: bool = False,
                          num_experts: int | None = None, top_k: int | None = None,
                          moe_ffn_hidden_size: int | None = None, training: bool = True) -> float:
    """Matrix-multiply FLOPs of one token (forward+backward when ``training``).

    ``model_cfg``: anything with ``num_layers``, ``hidden_size``, ``ffn_hidden_size``,
    ``num_attention_heads``, ``num_query_groups`` (None = multi-head) and ``activation``
    (``swiglu``/``gelu``), e.g. :class:`phoenix.config.ModelConfig`, whose ``moe`` section
    (when set) gives the MoE layers. ``vocab_size``: the padded vocabulary of the output
    layer. ``num_experts``/``top_k``: instead, a MoE MLP in every layer. Only the
    ``top_k`` active experts are counted.
    See the module docstring for the convention.
    """
    L = model_cfg.num_layers
    h = model_cfg.hidden_size
    n_q = model_cfg.num_attention_heads
    n_kv = model_cfg.num_query_groups or n_q
    d = h // n_q  # kv_channels
    activation = getattr(model_cfg, "activation", "swiglu")
    mlp_matrices = {"swiglu": 3, "gelu": 2}[activation]
    attn_proj = h * (n_q * d + 2 * n_kv * d) + n_q * d * h  # weights touched per token
    dense_mlp = mlp_matrices * h * model_cfg.ffn_hidden_size

    moe = getattr(model_cfg, "moe", None)
    if num_experts is None and moe is not None:  # a phoenix ModelConfig with model.moe
        moe_layers = len(moe.moe_layers(L))
        num_experts, top_k = moe.num_experts, moe.router_topk
        moe_ffn_hidden_size = moe.ffn_hidden_size
        shared = mlp_matrices * h * (moe.shared_expert_intermediate_size or 0)
    else:  # explicit arguments: a MoE MLP in every layer
        moe_layers, shared = (L if num_experts else 0), 0
    if num_experts:
        if not top_k or top_k > num_experts:
            raise ValueError(f"top_k must be in [1, num_experts={num_experts}], got {top_k}")
        f = moe_ffn_hidden_size or model_cfg.ffn_hidden_size
        # active experts + shared experts + router
        moe_mlp = top_k * mlp_matrices * h * f + shared + h * num_experts
    else:
        moe_mlp = 0
    mlp_total = (L - moe_layers) * dense_mlp + moe_layers * moe_mlp
    scores = 2 * seq_length * n_q * d  # Q K^T and A V: s*d MACs each, per head and token
    if causal:
        scores /= 2
    forward = 2 * (L * attn_proj + mlp_total) + 2 * L * scores + 2 * h * vocab_size
    return float(3 * forward if training else forward)


def default_peak_tflops(device_name: str | None, precision: str = "bf16") -> float | None:
    """Dense bf16/fp16 peak of a known GPU, else None (also for fp32 training)."""
    if not device_name or precision not in ("bf16", "fp16"):
        return None
    for key, peak in PEAK_TFLOPS:
        if key.lower() in device_name.lower():
            return peak
    return None


class ThroughputMonitor(Callback):
    """Writes the ``3_throughput/`` and ``memory/`` tags listed in the module docstring.

    ``interval``: every N steps (0 disables); the run's last step is always included.
    ``peak_tflops``: the per-GPU peak that ``3_throughput/mfu`` is measured against;
    None takes :func:`default_peak_tflops` of the CUDA device (none on CPU).
    ``flops_per_token``: override the architecture count (tests, exotic models).
    ``model`` and ``precision``: the run's ``model`` section and ``train.precision`` (the
    FLOPs count and the default peak); None: read from the trainer's config at train start.
    After a logged step, ``last`` holds ``{tag: value}`` on the logging rank.
    """

    priority = 400  # a producer (see the trainer's callback list for the order)
    state_key = "throughput"

    def __init__(self, interval: int, peak_tflops: float | None = None,
                 flops_per_token: float | None = None, log_last_step: bool = True, *,
                 model=None, precision: str | None = None):
        if interval < 0:
            raise ValueError(f"ThroughputMonitor: interval must be >= 0, got {interval}")
        if peak_tflops is not None and not peak_tflops > 0:
            raise ValueError(f"ThroughputMonitor: peak_tflops must be > 0, got {peak_tflops}")
        self.interval, self.log_last_step = interval, log_last_step
        self.peak_tflops, self.flops_per_token = peak_tflops, flops_per_token
        self.model, self.precision = model, precision
        self.last: dict[str, float] = {}
        self._first_step = None

    def on_train_start(self, trainer) -> None:
        layout = trainer.layout
        if self.model is None and self.flops_per_token is None:
            self.model = trainer.cfg.model
        if self.precision is None:
            self.precision = trainer.cfg.train.precision
        self._first_step = trainer.state.step + 1
        self._cuda = layout.device.type == "cuda"
        if self.flops_per_token is None:
            # The padded vocabulary of the output layer (GPTModel keeps it on every stage).
            self._vocab = trainer.gpt_models[0].vocab_size
        if self.peak_tflops is None and self._cuda:
            name = torch.cuda.get_device_name(layout.device)
            self.peak_tflops = default_peak_tflops(name, self.precision)
            if self.peak_tflops is None and layout.is_logging_rank:
                log.info("ThroughputMonitor: no peak TFLOP/s known for '%s' (%s); set "
                         "logging.peak_tflops to log 3_throughput/mfu", name, self.precision)

    def on_step_end(self, trainer, m: StepMetrics) -> None:
        if self._first_step is None or not trainer.metrics.due(self.interval, self.log_last_step):
            return
        layout = trainer.layout
        memory = self._memory(layout) if self._cuda else None  # collective: every rank
        if not layout.is_logging_rank:
            return
        world = layout.world_size
        tags = {f"{THROUGHPUT}/tokens_per_sec_per_gpu": m.tokens_per_second / world}
        tags[f"{THROUGHPUT}/forward_backward_time"] = m.forward_backward_time
        tags[f"{THROUGHPUT}/optimizer_time"] = m.optimizer_time
        if m.step != self._first_step:
            tags[f"{THROUGHPUT}/logging_time"] = m.callbacks_time_prev_step
        if m.step_time > 0:
            # Stages may change the batch and sequence length (attention FLOPs grow with it).
            stage = trainer.stages.stage_at(m.step - 1)
            per_token = self.flops_per_token or model_flops_per_token(
                self.model, stage.seq_length, self._vocab)
            tflops = per_token * stage.tokens_per_step / m.step_time / world / 1e12
            tags[f"{THROUGHPUT}/tflops_per_gpu"] = tflops
            if self.peak_tflops:
                tags[f"{THROUGHPUT}/mfu"] = tflops / self.peak_tflops
        if memory is not None:
            tags.update(memory)
        self.last = tags
        trainer.metrics.record_many(tags)

    @staticmethod
    def _memory(layout) -> dict[str, float]:
        stats = torch.tensor([torch.cuda.memory_allocated(), torch.cuda.memory_reserved(),
                              torch.cuda.max_memory_allocated()], dtype=torch.float64,
                             device=layout.device)
        if layout.world_size > 1:
            dist.all_reduce(stats, op=dist.ReduceOp.MAX)
        allocated, reserved, peak = (v / GIB for v in stats.tolist())
        return {"memory/allocated_gb": allocated, "memory/reserved_gb": reserved,
                "memory/max_allocated_gb": peak}
