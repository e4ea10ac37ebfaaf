"""The ``parallel`` section: TP/PP/CP/EP degrees, the distributed optimizer and the
data-parallel communication overlap."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from phoenix.config.typed import ConfigError, positive


@dataclass(kw_only=True)
class ParallelConfig:
    """Parallel layout; data parallel size is derived: world / (tensor * pipeline * context)."""

    tensor: int = 1
    pipeline: int = 1
    virtual_pipeline: Optional[int] = None
    """Interleaved 1F1B: model chunks per pipeline rank (megatron-core's
    ``virtual_pipeline_model_parallel_size``; Megatron-LM
    ``--num-layers-per-virtual-pipeline-stage`` / ``--virtual-pipeline-model-parallel-size``).
    Each rank holds this many non-adjacent slices of ``num_layers / (pipeline x
    virtual_pipeline)`` layers (chunk c of rank r: global slice ``c * pipeline + r``), which
    cuts the pipeline bubble from ``(p-1)/m`` to ``(p-1)/(v m)`` of a step at the cost of
    ``v`` times the point-to-point messages and ``1 + (p-1)/(p v)`` times the first
    stage's in-flight activations. Needs ``pipeline >= 2``, ``num_layers`` divisible by
    ``pipeline x virtual_pipeline`` and, for every stage, a number of micro-batches per
    step (global batch / (micro batch x data parallel)) divisible by ``pipeline``
    (megatron-core 0.16.1's interleaved schedule refuses the rest). None or 1: off."""
    context: int = 1
    """Context parallelism: each sequence split over this many ranks (megatron-core's
    load-balanced 2*CP chunks, ring attention in Transformer Engine). CUDA with TE only;
    every stage's seq_length must divide by 2*context."""
    expert: int = 1
    """Expert parallelism (EP) for MoE: each MoE layer's experts are split over this many
    ranks (``num_experts / expert`` each), tokens reach them through the
    ``model.moe.token_dispatcher``. EP ranks are taken from the tensor x context x data
    ranks of a pipeline stage: ``expert_tensor * expert`` must divide ``world / pipeline``
    (megatron-core's rule); the dense layers keep their own TP/DP layout."""
    expert_tensor: Optional[int] = None
    """Expert tensor parallelism (ETP): each expert's weights split over this many ranks.
    None: parallel.tensor (megatron-core's default). 1 keeps experts whole under TP > 1."""
    sequence_parallel: bool = False
    use_distributed_optimizer: bool = True
    """Shard optimizer state over data-parallel ranks (megatron-core DistributedOptimizer)."""
    overlap_grad_reduce: Optional[bool] = None
    """Reduce (or reduce-scatter) each gradient bucket as soon as its backward is done, on
    a side stream, overlapped with the rest of the backward (megatron's DDP
    ``overlap_grad_reduce``; Megatron-LM ``--overlap-grad-reduce``). None: on for CUDA
    with more than one data-parallel rank, off otherwise. The gradients every check and
    monitor reads are the fully reduced ones either way."""
    overlap_param_gather: Optional[bool] = None
    """With the distributed optimizer: all-gather the updated parameters bucket by bucket
    during the next forward instead of right after the optimizer step (megatron's DDP
    ``overlap_param_gather``; ``--overlap-param-gather``). None: on for CUDA with more than
    one data-parallel rank and the distributed optimizer. Checkpoints and eval first
    complete the gather, so they always see the updated weights."""
    align_param_gather: bool = False
    """Launch every pipeline stage's parameter all-gathers together, from the schedule
    (megatron's ``align_param_gather``; useful with a virtual pipeline). Needs
    overlap_param_gather."""
    bucket_size: Optional[int] = None
    """Parameters per gradient/parameter bucket (megatron's DDP ``bucket_size``): smaller
    buckets start communicating sooner, larger ones use the network better. None:
    megatron's default, max(40M, 1M x data-parallel size)."""
    tp_comm_overlap: bool = False
    """Overlap the tensor-parallel all-gathers / reduce-scatters with the GEMMs that need
    them, through Transformer Engine's userbuffers (megatron ``tp_comm_overlap``;
    Megatron-LM ``--tp-comm-overlap``, off by default). Needs CUDA with TE, tensor > 1 and
    sequence_parallel; the buffers are sized once for seq_length x micro_batch_size, so
    every stage must share one seq_length and eval its micro-batch size (no needle eval).
    Refused otherwise; not yet run by phoenix on a GPU."""

    def __post_init__(self):
        positive("parallel", tensor=self.tensor, pipeline=self.pipeline, context=self.context,
                  expert=self.expert, expert_tensor=self.expert_tensor,
                  bucket_size=self.bucket_size, virtual_pipeline=self.virtual_pipeline)
        if self.virtual_pipeline == 1:
            self.virtual_pipeline = None  # one chunk per rank: the plain 1F1B schedule
        if self.virtual_pipeline is not None and self.pipeline < 2:
            raise ConfigError(f"parallel.virtual_pipeline: {self.virtual_pipeline} chunks per "
                              f"rank need parallel.pipeline >= 2 (got {self.pipeline}); "
                              f"parallel.virtual_pipeline=1 turns it off")
        if self.sequence_parallel and self.tensor == 1:
            raise ConfigError("parallel.sequence_parallel: needs parallel.tensor > 1")
        if self.overlap_param_gather and not self.use_distributed_optimizer:
            raise ConfigError("parallel.overlap_param_gather: needs parallel.use_distributed_optimizer "
                              "(only its sharded update is gathered afterwards)")
        if self.tp_comm_overlap and not self.sequence_parallel:
            raise ConfigError("parallel.tp_comm_overlap: needs parallel.sequence_parallel (its "
                              "all-gather / reduce-scatter are what the GEMMs overlap)")
        if self.align_param_gather and self.overlap_param_gather is False:
            raise ConfigError("parallel.align_param_gather: needs parallel.overlap_param_gather")

    @property
    def chunks(self) -> int:
        """Model chunks per pipeline rank: ``virtual_pipeline``, or 1 when it is off."""
        return self.virtual_pipeline or 1

    def overlap(self, device: str, dp_size: int) -> tuple[bool, bool]:
        """(overlap_grad_reduce, overlap_param_gather) as they apply to a run on ``device``
        with ``dp_size`` data-parallel ranks: the set values, or the defaults above."""
        auto = device == "cuda" and dp_size > 1
        grad = auto if self.overlap_grad_reduce is None else self.overlap_grad_reduce
        param = (auto and self.use_distributed_optimizer if self.overlap_param_gather is None
                 else self.overlap_param_gather)
        return grad, param


def check_virtual_pipeline(p: ParallelConfig, num_layers: int,
                           micro_batches: dict[str, int]) -> None:
    """``parallel.virtual_pipeline`` against the model and the batch layout, refused up
    front with megatron-core 0.16.1's own rules (``TransformerConfig`` asserts the layer
    split; the interleaved schedule raises on the micro-batch count: with its default
    ``microbatch_group_size_per_vp_stage`` = pipeline, the count must be a multiple of the
    pipeline size). ``micro_batches``: micro-batches per step of each stage, by name."""
    v, pp = p.virtual_pipeline, p.pipeline
    if v is None:
        return
    if num_layers % (pp * v):
        raise ConfigError(f"parallel.virtual_pipeline: model.num_layers {num_layers} is not "
                          f"divisible by pipeline x virtual_pipeline = {pp}x{v}")
    for stage, m in micro_batches.items():
        if m % pp:
            raise ConfigError(
                f"parallel.virtual_pipeline: stage '{stage}' has {m} micro-batches per step "
                f"(global batch / (micro_batch_size x data parallel)); the interleaved schedule "
                f"needs a multiple of parallel.pipeline {pp}")
