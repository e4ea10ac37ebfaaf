"""The typed schema of a phoenix run: one dataclass per concern.

Field docstrings (the string under each field) are the reference for the YAML keys.
Checks that need only one section live in that section's ``__post_init__``; checks
that relate sections (and the world size) live in :meth:`RunConfig.validate_layout`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar, Literal, Optional

from phoenix.config.eval import EvalConfig
from phoenix.config.moe import MoEConfig, check_moe_layout, check_moe_model
from phoenix.config.monitoring import LoggingConfig
from phoenix.config.optim import OptimConfig
from phoenix.config.parallel import ParallelConfig, check_virtual_pipeline
from phoenix.config.performance import (Fp8Config, FusionsConfig, RecomputeConfig,
                                        check_recompute)
from phoenix.config.rope import RopeConfig
from phoenix.config.resolved import ResolvedRun, resolve_run
from phoenix.config.stages import StageConfig
from phoenix.config.typed import ConfigError, positive


@dataclass(kw_only=True)
class ModelConfig:
    """Architecture of a megatron-core ``GPTModel`` (Llama-style by default)."""

    preset: Optional[str] = None
    """Name of a file in configs/model/ (e.g. ``7b``) or a path to one; keys given next
    to it override the preset's values."""
    num_layers: int
    """Transformer layers (megatron ``num_layers``); divisible by ``parallel.pipeline``."""
    hidden_size: int
    """Model width (embedding and residual stream size)."""
    ffn_hidden_size: int
    """Width of the MLP's hidden layer (per branch for SwiGLU: fc1 is 2x this wide)."""
    num_attention_heads: int
    """Query heads; head dim = hidden_size / num_attention_heads."""
    num_query_groups: Optional[int] = None
    """Grouped-query attention: number of key/value heads (None = multi-head attention)."""
    max_seq_length: int
    """Longest context the model supports (RoPE tables are sized from it)."""
    vocab_size: Optional[int] = None
    """Embedding rows before padding; None takes the tokenizer's vocab size."""
    make_vocab_size_divisible_by: int = 128
    """The vocabulary is padded to a multiple of this times ``parallel.tensor`` (as
    Megatron-LM does), so the embedding splits evenly and GEMMs stay aligned."""
    normalization: Literal["RMSNorm", "LayerNorm"] = "RMSNorm"
    """Norm of every layer and the final norm."""
    norm_epsilon: float = 1e-5
    """Epsilon of the norms (Llama 1e-5; Qwen2 1e-6)."""
    activation: Literal["swiglu", "gelu"] = "swiglu"
    """MLP activation: ``swiglu`` (gated, Llama) or ``gelu`` (GPT-2 style)."""
    position_embedding: Literal["rope", "learned_absolute"] = "rope"
    """Rotary (RoPE) or learned absolute position embeddings."""
    rope: Optional[RopeConfig] = None
    """Rotary embedding: ``base`` (theta; raised, e.g. to 1e6, when extending the
    context) and long-context ``scaling`` (linear, ntk, dynamic_ntk, yarn, llama3; see
    phoenix.config.rope). Left out: plain RoPE with base 10000. A stage may replace it
    (``stages[i].rope``) for context extension."""
    tie_embeddings: bool = False
    """Share the input embedding with the output layer."""
    add_bias_linear: bool = False
    """Biases in the attention and MLP linear layers."""
    add_qkv_bias: bool = False
    """Biases in the query/key/value projection only (Qwen2; megatron ``add_qkv_bias``)."""
    qk_layernorm: bool = False
    """Normalise queries and keys per head before attention (stabilises large-LR runs)."""
    init_method_std: float = 0.02
    """Std of the normal init of weights (output projections are scaled by 1/sqrt(2L))."""
    attention_dropout: float = 0.0
    """Dropout on attention probabilities (0 for pretraining at scale)."""
    hidden_dropout: float = 0.0
    """Dropout on the residual branches."""
    reference_lr: Optional[float] = None
    """Peak LR the size table recommends; used when optim.lr is not set."""
    moe: Optional[MoEConfig] = None
    """Mixture of experts in place of the dense MLP (``num_experts``, ``router_topk``,
    ``layer_freq``, expert width, shared experts, router and load-balancing settings; see
    phoenix.config.moe). None: a dense model. Expert parallelism is ``parallel.expert``."""
    attention_backend: Literal["auto", "te", "sdpa", "unfused"] = "auto"
    """Core attention kernel. ``te``: Transformer Engine's attention, which picks flash or
    cuDNN fused attention itself (megatron ``attention_backend: auto``). ``sdpa``:
    ``torch.nn.functional.scaled_dot_product_attention`` as the layer spec's core attention
    (phoenix.model.sdpa_attention; flash / memory-efficient kernels on CUDA). ``unfused``:
    megatron's ``DotProductAttention`` on the local spec (TE's unfused attention, megatron
    ``attention_backend: unfused``, with TE), which keeps each head's s x s softmax for the
    backward. ``auto``: te with TE on CUDA, else sdpa on CUDA, else unfused (CPU). ``te``
    without TE is refused; so are sdpa with context parallelism and, with TE, sdpa with
    data.document_mask (packed THD sequences)."""
    fusions: FusionsConfig = field(default_factory=FusionsConfig)
    """Fused kernels: ``bias_activation`` (SwiGLU / bias-GeLU), ``cross_entropy``
    (none / native / te), ``rope`` and ``gradient_accumulation`` (Transformer Engine); see
    phoenix.config.performance. Left out: Megatron-LM's defaults where they can run."""
    recompute: RecomputeConfig = field(default_factory=RecomputeConfig)
    """Activation recomputation: ``granularity`` (none / selective / full), ``method``
    (uniform / block) and ``num_layers`` for full, ``modules`` for selective (megatron
    ``recompute_*``; see phoenix.config.performance). Default none."""

    RENAMED_KEYS: ClassVar[dict[str, str]] = {"rotary_base": "rope.base"}

    def __post_init__(self):
        if self.position_embedding == "learned_absolute" and self.rope is not None:
            raise ConfigError("model.rope: set, but model.position_embedding is learned_absolute "
                              "(remove model.rope or use position_embedding: rope)")
        if self.position_embedding == "rope" and self.rope is None:
            self.rope = RopeConfig()
        positive("model", num_layers=self.num_layers, hidden_size=self.hidden_size,
                  ffn_hidden_size=self.ffn_hidden_size, num_attention_heads=self.num_attention_heads,
                  num_query_groups=self.num_query_groups, max_seq_length=self.max_seq_length,
                  vocab_size=self.vocab_size)
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(
                f"model.num_attention_heads: hidden_size {self.hidden_size} is not divisible by "
                f"num_attention_heads {self.num_attention_heads}")
        if self.num_query_groups and self.num_attention_heads % self.num_query_groups:
            raise ConfigError(
                f"model.num_query_groups: num_attention_heads {self.num_attention_heads} is not "
                f"divisible by num_query_groups {self.num_query_groups}")
        if self.moe is not None:
            check_moe_model(self.moe, self.num_layers)


@dataclass(kw_only=True)
class DatasetEntry:
    """One tokenised dataset: a megatron-core ``.bin/.idx`` prefix and its blend weight."""

    prefix: str
    weight: float = 1.0
    name: Optional[str] = None
    """Short name used in logs; defaults to the prefix's file name."""
    min_share: float = 0.0
    """If the weight is below this share, the dataset comes in bursts: it fills
    round(min_share * global_batch_size) samples of a batch, in a weight/min_share fraction
    of the batches (evenly spaced), and is absent in between. 0 disables."""
    group_mode: Literal["none", "batch"] = "none"
    """``batch``: keep each group of ``PREFIX.groups.npy`` (a repository, a book) inside one
    global batch (consecutive batches when larger); samples never cross groups."""
    pack_groups: int = 0
    """Group packing for ``group_mode: batch``: join groups (in a fixed shuffle) into units
    of at most this many samples, each cut as one stream, so only a unit's last sample is
    padded (see phoenix.data.samples). Every group still lands whole in one global batch:
    the plan refuses a value above the smallest per-batch count it can keep whole (its
    error names the largest allowed). 0: off, every group's last sample is padded."""
    min_document_tokens: int = 0
    """Read only the documents of at least this many tokens: a view of the same
    ``.bin/.idx`` (no copy, no re-tokenisation), packed like any dataset. Next to the
    full prefix under another name, it upsamples long documents for context extension
    (e.g. ``{prefix: data/web, name: web_long, min_document_tokens: 16384}``). 0: all."""

    def __post_init__(self):
        if self.min_document_tokens < 0:
            raise ConfigError(f"min_document_tokens: must be >= 0, got {self.min_document_tokens} "
                              f"for dataset '{self.prefix}'")
        if self.pack_groups < 0:
            raise ConfigError(f"pack_groups: must be >= 0, got {self.pack_groups} for dataset "
                              f"'{self.prefix}'")
        if self.min_document_tokens and self.group_mode != "none":
            raise ConfigError(f"min_document_tokens: cannot be combined with group_mode "
                              f"'{self.group_mode}' (dataset '{self.prefix}'): a length view "
                              f"would break groups apart")
        if self.weight < 0 or not math.isfinite(self.weight):
            raise ConfigError(f"weight: must be >= 0 and finite, got {self.weight} for "
                              f"dataset '{self.prefix}'")
        if not 0 <= self.min_share < 1:
            raise ConfigError(f"min_share: must be in [0, 1), got {self.min_share} for dataset "
                              f"'{self.prefix}'")

    @property
    def display_name(self) -> str:
        return self.name or self.prefix.rstrip("/").split("/")[-1]

    @property
    def source(self) -> tuple[str, int]:
        """What the dataset's samples are cut from: (prefix, min_document_tokens)."""
        return self.prefix, self.min_document_tokens

    @property
    def source_label(self) -> str:
        m = self.min_document_tokens
        return self.prefix + (f" (documents >= {m} tokens)" if m else "")


@dataclass(kw_only=True)
class DataConfig:
    datasets: list[DatasetEntry]
    seq_length: int
    """Tokens per training sample."""
    sampler: Literal["plan", "megatron"] = "plan"
    """``plan``: phoenix's data plan (exact per-batch mixture, min_share bursts, whole
    groups). ``megatron``: megatron-core's BlendedDataset/GPTDataset (for comparison;
    ignores min_share and group_mode)."""
    cache_dir: Optional[str] = None
    """Where data plans and sample indices are cached. Default: the plans in
    ``<output_dir>/data_cache``, the sample indices (each dataset cut into samples, the
    costly part at scale) in a cache every run over the same data shares,
    ``$PHOENIX_CACHE_DIR`` else ``~/.cache/phoenix`` (``sample_index/``; keyed by the data
    files' content and the cut, safe for concurrent builders)."""
    prefetch_batches: int = 2
    """Global batches this rank reads ahead in one background thread while the current
    step trains (0: read each batch when it is needed)."""
    document_mask: bool = False
    """Each document of a packed sample attends only to itself and its position ids restart
    at 0 (Megatron-LM's ``--reset-attention-mask --reset-position-ids``); documents end at
    the EOD token. Local layer spec (CPU, or CUDA without Transformer Engine): a dense
    causal block-diagonal mask, O(seq_length^2) memory per micro-batch; with Transformer
    Engine: packed THD sequences (``cu_seqlens``), no dense mask. Eval uses it too."""
    eod_mask_loss: bool = False
    """No loss where the input token is EOD, i.e. on predicting a document's first token
    from the previous document (Megatron-LM's ``--eod-mask-loss``)."""
    dense_mask_max_seq_length: int = 16384
    """Longest sequence (of any stage) for which ``document_mask`` may build the dense
    mask on the local spec: at 16k the bool mask is 256 MiB and the fp32 attention scores
    1 GiB per head and sample. Above it a CPU run is refused at start."""

    RENAMED_KEYS: ClassVar[dict[str, str]] = {"num_workers": "prefetch_batches"}

    def __post_init__(self):
        if not self.datasets:
            raise ConfigError("data.datasets: at least one dataset is required")
        if sum(d.weight for d in self.datasets) <= 0:
            raise ConfigError("data.datasets: the weights sum to zero")
        names = [d.display_name for d in self.datasets]
        for i, name in enumerate(names):
            if name in names[:i]:
                raise ConfigError(f"data.datasets[{i}].name: '{name}' is used twice; give each "
                                  f"dataset its own name")
        positive("data", seq_length=self.seq_length)
        if self.prefetch_batches < 0:
            raise ConfigError(f"data.prefetch_batches: must be >= 0, got {self.prefetch_batches}")
        positive("data", dense_mask_max_seq_length=self.dense_mask_max_seq_length)
        views = [d.display_name for d in self.datasets if d.min_document_tokens]
        if views and self.sampler != "plan":
            raise ConfigError(f"data.sampler: '{self.sampler}' cannot read min_document_tokens "
                              f"views (datasets {views}); use the phoenix plan sampler")


@dataclass(kw_only=True)
class TokenizerConfig:
    """The tokenizer the data was tokenised with: exactly one of ``model`` and ``hf_dir``."""

    model: Optional[str] = None
    """A sentencepiece model file (``.model``), or a Hugging Face ``tokenizer.json`` (a file
    ending in ``.json``, read with the ``tokenizers`` library; its post-processor decides
    BOS, e.g. Llama-3 prepends it). Checked when the run's inputs are checked."""
    hf_dir: Optional[str] = None
    """A Hugging Face tokenizer folder: ``tokenizer.json`` plus ``tokenizer_config.json``
    (whose ``bos_token`` / ``eos_token`` name BOS and the end-of-document token)."""

    def __post_init__(self):
        if self.model is None and self.hf_dir is None:
            raise ConfigError("missing required config key 'tokenizer.model' (a sentencepiece "
                              ".model or a tokenizer.json; or set tokenizer.hf_dir to a Hugging "
                              "Face tokenizer folder)")
        if self.model is not None and self.hf_dir is not None:
            raise ConfigError("tokenizer.hf_dir: set together with tokenizer.model; set only one")

    @property
    def path(self) -> str:
        """The file or folder the tokenizer is loaded from (for messages)."""
        return self.model if self.model is not None else self.hf_dir


@dataclass(kw_only=True)
class TrainConfig:
    steps: Optional[int] = None
    """Number of optimizer steps (global batches) of the run. With ``stages`` it may be
    left out (it is then their sum); if given, the stages must add up to it."""
    global_batch_size: int
    """Samples per optimizer step, over all data-parallel ranks (a stage may set its own)."""
    micro_batch_size: int = 1
    precision: Literal["fp32", "bf16", "fp16"] = "bf16"
    """bf16 is the GPU default; the cpu device always trains in fp32."""
    seed: int = 1234
    stop_at_step: Optional[int] = None
    """End this job after this step (saving a checkpoint if save_at_end), e.g. to fit a
    cluster time slot; the LR schedule and data still span ``steps``."""
    time_limit_minutes: Optional[float] = None
    """End the job cleanly (finish the step, save, exit 0) once it has trained this long,
    as on SIGTERM / SIGUSR1; a later job resumes. None: no limit."""
    on_nonfinite_loss: Literal["stop", "skip"] = "stop"
    """What a NaN/Inf loss or gradient does: stop the run before the update (one error line
    naming the step and the last good checkpoint) or skip the update (counted in
    ``1_train/skipped_steps``). Either way nothing non-finite reaches the weights."""
    manual_gc_interval: int = 0
    """Python's garbage collector off during training and run (``gc.collect()``) every N
    steps on every rank, so no rank pauses at a random moment and stalls the others in a
    collective (Megatron-LM's ``--manual-gc --manual-gc-interval``). 0: Python's own
    automatic collection (the default)."""
    skip_batches: list[list[int]] = field(default_factory=list)
    """``[[start, end], ...]``: inclusive 1-based step ranges whose global batches are drawn
    from the data plan but not trained (Megatron-LM ``--skip-train-iteration-range``; see
    phoenix.train.skip_batches). Checked against the run's steps (phoenix.config.skip)."""
    fp8: Optional[Fp8Config] = None
    """fp8 GEMMs with Transformer Engine: ``format`` (hybrid / e4m3), ``recipe`` (delayed /
    tensorwise / mxfp8 / blockwise), ``amax_history_len``, ``amax_compute_algo`` (megatron
    ``fp8``, ``fp8_recipe``, ``fp8_amax_*``; see phoenix.config.performance). None: no fp8.
    Refused without TE on CUDA; not yet run by phoenix on a GPU."""

    def __post_init__(self):
        positive("train", steps=self.steps, global_batch_size=self.global_batch_size,
                  micro_batch_size=self.micro_batch_size, stop_at_step=self.stop_at_step,
                  time_limit_minutes=self.time_limit_minutes)
        if self.manual_gc_interval < 0:
            raise ConfigError(f"train.manual_gc_interval: must be >= 0 (0: automatic), got "
                              f"{self.manual_gc_interval}")


@dataclass(kw_only=True)
class CheckpointConfig:
    save_interval: int = 0
    """Save every N steps (0: only at the end)."""
    save_at_end: bool = True
    save_initial: bool = False
    """Also save before the first step (a fixed starting point for comparisons)."""
    keep_last: int = 0
    """Delete older checkpoints beyond the newest N (0 keeps all)."""
    resume: bool = True
    """Resume from the newest complete checkpoint in ``<output_dir>/checkpoints`` if any."""
    init_from: Optional[str] = None
    """Continual pretraining: load model weights (any TP/PP layout) from this checkpoint
    directory, or from the latest checkpoint of this run directory, when starting fresh.
    The LR schedule, data position and stages start from step 0 of this run; the source
    is only read."""
    init_optimizer: bool = False
    """With init_from: also load the optimizer state (Adam moments and step counts), e.g.
    to continue a run under a new mixture without re-warming Adam's statistics."""
    on_save_error: Literal["stop", "continue"] = "stop"
    """What a periodic save that fails (a full disk, a quota, an I/O error) does: ``stop``
    ends the job (exit code 3) with one line naming the intact previous checkpoint;
    ``continue`` says the same and keeps training, trying again at the next save_interval.
    Either way the failed save's temporary directory is removed. The save at the end of
    the job (or on a stop signal) stops the job when it fails, whatever this says."""
    async_save: bool = False
    """Write the shards in the background (megatron-core's asynchronous sharded save:
    ``dist_checkpointing.save(..., async_sharded_save=True)`` driven by an
    ``AsyncCallsQueue``): the step that saves only plans the save and stages its tensors
    in host memory, forked writer processes write them while training goes on, and the
    save is finished (metadata, state bundle, rename into place, ``latest``, keep_last)
    at a later step once every rank's writer is done. A save not yet finished is finished
    before the next one, at the end of the job and on a stop signal; a killed job leaves
    the previous checkpoint as latest. A failed write follows ``on_save_error``."""
    optimizer_format: Literal["dp_reshardable", "fully_reshardable"] = "dp_reshardable"
    """How the distributed optimizer's state is written (megatron-core
    ``metadata["distrib_optim_sharding_type"]``). ``dp_reshardable``: every rank writes its
    own shard as it lies in memory, with no gather (host memory bounded by the rank's own
    shard); it loads at any data-parallel size but only at the TP/PP/CP/EP and gradient
    buckets it was saved with: a resume at another layout is refused with the
    ``phoenix reshard`` command that converts it. ``fully_reshardable``: the state is
    gathered per parameter on every data-parallel rank before it is written (host memory
    per rank: the whole TP x PP shard of the fp32 state); it loads at any layout."""

    def __post_init__(self):
        if self.save_interval < 0 or self.keep_last < 0:
            raise ConfigError("checkpoint.save_interval and checkpoint.keep_last must be >= 0")
        if self.init_optimizer and not self.init_from:
            raise ConfigError("checkpoint.init_optimizer: needs checkpoint.init_from")


@dataclass(kw_only=True)
class RuntimeConfig:
    device: Literal["cuda", "cpu"] = "cuda"
    """``cuda``: NCCL, Transformer Engine layer spec when importable. ``cpu``: gloo and the
    CPU emulation of megatron-core (tests, dry runs on a laptop)."""
    distributed_timeout_minutes: int = 30


@dataclass(kw_only=True)
class RunConfig:
    """A whole training run, as loaded from a recipe YAML."""

    name: str = "run"
    output_dir: str
    """Run directory: checkpoints/, tensorboard/, config.yaml and logs go here."""
    model: ModelConfig
    data: DataConfig
    tokenizer: TokenizerConfig
    train: TrainConfig
    optim: OptimConfig = field(default_factory=OptimConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    eval: Optional[EvalConfig] = None
    """Held-out evaluation (loss, perplexity, top-1/top-5 accuracy per set); see
    phoenix.config.eval. None: no evaluation."""
    stages: Optional[list[StageConfig]] = None
    """Multi-stage recipe: stages run back to back in one job, each with its own mixture
    of data.datasets (replay, mixture warmup), LR phases, sequence length and batch size
    (see phoenix.config.stages). None: one stage with data.datasets' weights."""

    def __post_init__(self):
        if self.optim.lr is None:
            if self.model.reference_lr is None:
                raise ConfigError("optim.lr: not set, and the model has no reference_lr")
            self.optim.lr = self.model.reference_lr
        if self.optim.min_lr is None:
            self.optim.min_lr = 0.1 * self.optim.lr
        if self.optim.min_lr > self.optim.lr:
            raise ConfigError(f"optim.min_lr: {self.optim.min_lr} is above optim.lr {self.optim.lr}")
        if self.data.seq_length > self.model.max_seq_length:
            raise ConfigError(f"data.seq_length: {self.data.seq_length} exceeds "
                              f"model.max_seq_length {self.model.max_seq_length}")
        needle = self.eval.needle if self.eval is not None else None
        if needle is not None and (self.parallel.pipeline > 1 or self.parallel.context > 1):
            key = "pipeline" if self.parallel.pipeline > 1 else "context"
            raise ConfigError(f"eval.needle: the needle eval decodes token by token and needs "
                              f"parallel.{key}=1 (got {getattr(self.parallel, key)}); remove "
                              f"eval.needle and evaluate a checkpoint of this run with "
                              f"phoenix eval --needle parallel.{key}=1")
        for i, n in enumerate((needle.lengths or []) if needle is not None else []):
            if n > self.model.max_seq_length:
                raise ConfigError(f"eval.needle.lengths[{i}]: {n} exceeds model.max_seq_length "
                                  f"{self.model.max_seq_length}")
        if self.runtime.device == "cpu":
            self.train.precision = "fp32"
        # Stage lengths (tokens -> steps, sum vs train.steps), mixtures, replay, warmup and
        # the LR phases, resolved once; train.steps is then the stages' total.
        self._resolved = resolve_run(self)
        self.train.steps = self._resolved.total_steps
        self._check_dense_mask()
        self._check_moe()

    def _check_dense_mask(self) -> None:
        """The dense document mask is O(seq^2): bounded on CPU (CUDA checks at start,
        when it knows whether Transformer Engine packs the documents instead)."""
        if not self.data.document_mask or self.runtime.device != "cpu":
            return
        longest = max(s.seq_length for s in self._resolved.stages.stages)
        if longest > self.data.dense_mask_max_seq_length:
            raise ConfigError(
                f"data.document_mask: sequences of {longest} tokens need a dense "
                f"{longest}x{longest} mask per sample on CPU, above "
                f"data.dense_mask_max_seq_length {self.data.dense_mask_max_seq_length}; "
                f"raise that limit (memory is O(seq^2)) or train long contexts on CUDA with "
                f"Transformer Engine (packed THD sequences)")

    def _check_moe(self, world_size: Optional[int] = None) -> None:
        """MoE against the parallel layout (phoenix.config.moe.check_moe_layout)."""
        m, p = self.model, self.parallel
        check_moe_layout(m.moe, dense_ffn_hidden_size=m.ffn_hidden_size,
                         add_bias_linear=m.add_bias_linear, tensor=p.tensor, pipeline=p.pipeline,
                         expert=p.expert, expert_tensor=p.expert_tensor,
                         sequence_parallel=p.sequence_parallel, world_size=world_size)

    @property
    def resolved(self) -> ResolvedRun:
        """Stages and LR schedule on the step axis (computed once, when the config was built)."""
        return self._resolved

    def data_parallel_size(self, world_size: int) -> int:
        return world_size // (self.parallel.tensor * self.parallel.pipeline * self.parallel.context)

    def _micro_batches_per_stage(self, dp: int) -> dict[str, int]:
        """Micro-batches per step of every stage (by stage name) at ``dp`` data-parallel
        ranks; a stage whose batch does not divide is left out (refused elsewhere)."""
        per = self.train.micro_batch_size * dp
        return {s.name: s.global_batch_size // per for s in self._resolved.stages.stages
                if s.global_batch_size % per == 0}

    def validate_layout(self, world_size: int) -> None:
        """Check that the parallel layout fits ``world_size`` processes and the model."""
        p, m, t = self.parallel, self.model, self.train
        model_parallel = p.tensor * p.pipeline * p.context
        if world_size % model_parallel:
            raise ConfigError(
                f"parallel: world size {world_size} is not divisible by tensor*pipeline*context "
                f"= {p.tensor}*{p.pipeline}*{p.context}")
        if m.num_attention_heads % p.tensor:
            raise ConfigError(f"parallel.tensor: model.num_attention_heads {m.num_attention_heads} "
                              f"is not divisible by tensor parallel size {p.tensor}")
        groups = m.num_query_groups or m.num_attention_heads
        if groups % p.tensor:
            raise ConfigError(f"parallel.tensor: model.num_query_groups {groups} is not divisible "
                              f"by tensor parallel size {p.tensor}")
        if m.ffn_hidden_size % p.tensor:
            raise ConfigError(f"parallel.tensor: model.ffn_hidden_size {m.ffn_hidden_size} is not "
                              f"divisible by tensor parallel size {p.tensor}")
        if m.num_layers % p.pipeline:
            raise ConfigError(f"parallel.pipeline: model.num_layers {m.num_layers} is not divisible "
                              f"by pipeline parallel size {p.pipeline}")
        dp = self.data_parallel_size(world_size)
        if t.global_batch_size % (t.micro_batch_size * dp):
            raise ConfigError(
                f"train.global_batch_size: {t.global_batch_size} is not divisible by "
                f"micro_batch_size * data_parallel_size = {t.micro_batch_size}*{dp}")
        if p.virtual_pipeline is not None:
            check_virtual_pipeline(p, m.num_layers, self._micro_batches_per_stage(dp))
        self._check_moe(world_size)
        check_recompute(m.recompute, num_layers=m.num_layers, pipeline=p.pipeline, moe=m.moe)
        for i, stage in enumerate(self.stages or []):
            B = stage.global_batch_size
            if B is not None and B % (t.micro_batch_size * dp):
                raise ConfigError(
                    f"stages[{i}].global_batch_size: {B} is not divisible by "
                    f"micro_batch_size * data_parallel_size = {t.micro_batch_size}*{dp}")
