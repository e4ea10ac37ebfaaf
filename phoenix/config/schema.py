"""The typed schema of a phoenix run: one dataclass per concern.

Field docstrings (the string under each field) are the reference for the YAML keys.
Checks that need only one section live in that section's ``__post_init__``; checks
that relate sections (and the world size) live in :meth:`RunConfig.validate_layout`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal, Optional

# A module import (not `from ... import`): phoenix.optim.schedule imports phoenix.config,
# so the class may not exist yet here; the annotation is resolved when a config is built.
import phoenix.eval.config as eval_config
import phoenix.monitor.spikes as monitor_spikes
import phoenix.optim.param_groups as optim_param_groups
import phoenix.optim.schedule as optim_schedule
import phoenix.stages.config as stage_config
from phoenix.config.typed import ConfigError


def _positive(section: str, **values) -> None:
    for name, value in values.items():
        if value is not None and not (math.isfinite(value) and value > 0):
            raise ConfigError(f"{section}.{name}: must be > 0, got {value}")


@dataclass(kw_only=True)
class ModelConfig:
    """Architecture of a megatron-core ``GPTModel`` (Llama-style by default)."""

    preset: Optional[str] = None
    """Name of a file in configs/model/ (e.g. ``7b``) or a path to one; keys given next
    to it override the preset's values."""
    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    num_attention_heads: int
    num_query_groups: Optional[int] = None
    """Grouped-query attention: number of key/value heads (None = multi-head attention)."""
    max_seq_length: int
    """Longest context the model supports (RoPE tables are sized from it)."""
    vocab_size: Optional[int] = None
    """Embedding rows before padding; None takes the tokenizer's vocab size."""
    make_vocab_size_divisible_by: int = 128
    normalization: Literal["RMSNorm", "LayerNorm"] = "RMSNorm"
    norm_epsilon: float = 1e-5
    activation: Literal["swiglu", "gelu"] = "swiglu"
    position_embedding: Literal["rope", "learned_absolute"] = "rope"
    rotary_base: int = 10000
    tie_embeddings: bool = False
    add_bias_linear: bool = False
    qk_layernorm: bool = False
    init_method_std: float = 0.02
    attention_dropout: float = 0.0
    hidden_dropout: float = 0.0
    reference_lr: Optional[float] = None
    """Peak LR the size table recommends; used when optim.lr is not set."""

    def __post_init__(self):
        _positive("model", num_layers=self.num_layers, hidden_size=self.hidden_size,
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


@dataclass(kw_only=True)
class ParallelConfig:
    """Parallel layout; data parallel size is derived: world / (tensor * pipeline * context)."""

    tensor: int = 1
    pipeline: int = 1
    context: int = 1
    """Context parallelism (reserved: must be 1 for now)."""
    expert: int = 1
    """Expert parallelism for MoE (reserved: must be 1 for now)."""
    sequence_parallel: bool = False
    use_distributed_optimizer: bool = True
    """Shard optimizer state over data-parallel ranks (megatron-core DistributedOptimizer)."""

    def __post_init__(self):
        _positive("parallel", tensor=self.tensor, pipeline=self.pipeline, context=self.context,
                  expert=self.expert)
        if self.context != 1:
            raise ConfigError("parallel.context: context parallelism is not supported yet (must be 1)")
        if self.expert != 1:
            raise ConfigError("parallel.expert: expert parallelism is not supported yet (must be 1)")
        if self.sequence_parallel and self.tensor == 1:
            raise ConfigError("parallel.sequence_parallel: needs parallel.tensor > 1")


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

    def __post_init__(self):
        if self.weight < 0 or not math.isfinite(self.weight):
            raise ConfigError(f"weight: must be >= 0 and finite, got {self.weight} for "
                              f"dataset '{self.prefix}'")
        if not 0 <= self.min_share < 1:
            raise ConfigError(f"min_share: must be in [0, 1), got {self.min_share} for dataset "
                              f"'{self.prefix}'")

    @property
    def display_name(self) -> str:
        return self.name or self.prefix.rstrip("/").split("/")[-1]


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
    """Where data plans and sample indices are cached; default ``<output_dir>/data_cache``."""
    num_workers: int = 1
    """Background threads that prefetch the next global batches."""

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
        _positive("data", seq_length=self.seq_length)
        if self.num_workers < 0:
            raise ConfigError(f"data.num_workers: must be >= 0, got {self.num_workers}")


@dataclass(kw_only=True)
class TokenizerConfig:
    model: str
    """Path to a sentencepiece ``.model`` file (the one the data was tokenised with)."""


@dataclass(kw_only=True)
class OptimConfig:
    lr: Optional[float] = None
    """Peak learning rate; defaults to model.reference_lr."""
    min_lr: Optional[float] = None
    """Floor of the decay; default 10% of lr (the seeds' convention)."""
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    """Global gradient-norm clip (0 disables)."""
    warmup_steps: int = 0
    decay_style: Literal["constant", "linear", "cosine", "WSD"] = "cosine"
    decay_steps: Optional[int] = None
    """Steps from 0 to the end of the decay; default train.steps."""
    wsd_decay_steps: Optional[int] = None
    wsd_decay_style: Literal["linear", "cosine", "exponential", "minus_sqrt"] = "linear"
    schedule: Optional[optim_schedule.ScheduleConfig] = None
    """Multi-phase LR schedule (warmup/constant/decay phases, see phoenix.optim.schedule).
    When set it defines the LR: lr and min_lr come from its peak_lr and min_lr, and
    warmup_steps, decay_steps and wsd_decay_steps must be left unset."""
    param_groups: list[optim_param_groups.ParamGroupRule] = field(default_factory=list)
    """LR multipliers by parameter-name pattern (first matching rule wins), e.g.
    ``[{params: ["embedding.*"], lr_mult: 2.0}]``; see phoenix.optim.param_groups."""
    freeze: Optional[optim_param_groups.FreezeConfig] = None
    """Freeze parameters by name pattern for the first ``steps`` optimizer steps (LR 0,
    gradients zeroed before the step), e.g. all but the embeddings."""

    def __post_init__(self):
        if self.schedule is not None:
            for key, value in (("lr", self.schedule.peak_lr), ("min_lr", self.schedule.min_lr)):
                mine = getattr(self, key)
                if mine is not None and mine != value:
                    name = "peak_lr" if key == "lr" else key
                    raise ConfigError(f"optim.{key}: {mine} conflicts with optim.schedule.{name} "
                                      f"{value}; set it in the schedule only")
            self.lr, self.min_lr = self.schedule.peak_lr, self.schedule.min_lr
            for key in ("warmup_steps", "decay_steps", "wsd_decay_steps"):
                if getattr(self, key):
                    raise ConfigError(f"optim.{key}: not used with optim.schedule "
                                      f"(its phases define the schedule)")
        _positive("optim", lr=self.lr, decay_steps=self.decay_steps)
        if self.min_lr is not None and self.min_lr < 0:
            raise ConfigError(f"optim.min_lr: must be >= 0, got {self.min_lr}")
        if self.lr is not None and self.min_lr is not None and self.min_lr > self.lr:
            raise ConfigError(f"optim.min_lr: {self.min_lr} is above optim.lr {self.lr}")
        if self.warmup_steps < 0:
            raise ConfigError(f"optim.warmup_steps: must be >= 0, got {self.warmup_steps}")
        if self.decay_style == "WSD" and not self.wsd_decay_steps:
            raise ConfigError("optim.wsd_decay_steps: required with decay_style WSD")


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
    on_nonfinite_loss: Literal["stop", "skip"] = "stop"
    """What a NaN/Inf loss does: stop the run (keeping the last good checkpoint) or skip the step."""

    def __post_init__(self):
        _positive("train", steps=self.steps, global_batch_size=self.global_batch_size,
                  micro_batch_size=self.micro_batch_size, stop_at_step=self.stop_at_step)


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

    def __post_init__(self):
        if self.save_interval < 0 or self.keep_last < 0:
            raise ConfigError("checkpoint.save_interval and checkpoint.keep_last must be >= 0")
        if self.init_optimizer and not self.init_from:
            raise ConfigError("checkpoint.init_optimizer: needs checkpoint.init_from")


@dataclass(kw_only=True)
class LoggingConfig:
    log_interval: int = 1
    """Console and TensorBoard scalars every N steps."""
    tensorboard: bool = True
    norm_interval: Optional[int] = None
    """Per-layer grad/param/update norms in TensorBoard every N steps (default: every
    log_interval steps; 0: off). Costs one fp32 copy of this rank's owned weights and one
    all-reduce on those steps only."""

    dataset_loss_interval: Optional[int] = None
    """Per-dataset loss/tokens in TensorBoard every N steps (default log_interval; 0: off)."""
    throughput_interval: Optional[int] = None
    """throughput/* (TFLOP/s, MFU, time split) and memory/* every N steps (default
    log_interval; 0: off)."""
    peak_tflops: Optional[float] = None
    """Per-GPU peak TFLOP/s for throughput/mfu; default from the GPU name (bf16 dense,
    e.g. H100/H200 989); on CPU MFU is logged only when this is set."""
    spikes: monitor_spikes.SpikeConfig = field(default_factory=lambda: monitor_spikes.SpikeConfig())
    """Loss / grad-norm spike detection, spikes.jsonl with the batch's provenance, and
    optionally skipping the update on a loss spike (see phoenix.monitor.spikes)."""

    def __post_init__(self):
        _positive("logging", log_interval=self.log_interval)
        for key in ("norm_interval", "dataset_loss_interval", "throughput_interval"):
            if getattr(self, key) is None:
                setattr(self, key, self.log_interval)
            if getattr(self, key) < 0:
                raise ConfigError(f"logging.{key}: must be >= 0, got {getattr(self, key)}")
        _positive("logging", peak_tflops=self.peak_tflops)


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
    eval: Optional[eval_config.EvalConfig] = None
    """Held-out evaluation (loss, perplexity, top-1/top-5 accuracy per set); see
    phoenix.eval.config. None: no evaluation."""
    stages: Optional[list[stage_config.StageConfig]] = None
    """Multi-stage recipe: stages run back to back in one job, each with its own mixture
    of data.datasets (replay, mixture warmup), LR phases, sequence length and batch size
    (see phoenix.stages). None: one stage with data.datasets' weights."""

    def stage_table(self):
        """The stages on the step axis (phoenix.stages.table.StageTable)."""
        from phoenix.stages.table import build_stage_table

        return build_stage_table(self)

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
        if self.runtime.device == "cpu":
            self.train.precision = "fp32"
        # Stage lengths (tokens -> steps, sum vs train.steps), mixtures, replay, warmup.
        self.train.steps = self.stage_table().total_steps
        if optim_schedule.uses_multi_phase(self):  # phases must cover train.steps exactly
            optim_schedule.resolve(optim_schedule.schedule_from_run_config(self),
                                   optim_schedule.tokens_per_step_of(self),
                                   total_steps=self.train.steps, prefix="optim.schedule")

    def data_parallel_size(self, world_size: int) -> int:
        return world_size // (self.parallel.tensor * self.parallel.pipeline * self.parallel.context)

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
        for i, stage in enumerate(self.stages or []):
            B = stage.global_batch_size
            if B is not None and B % (t.micro_batch_size * dp):
                raise ConfigError(
                    f"stages[{i}].global_batch_size: {B} is not divisible by "
                    f"micro_batch_size * data_parallel_size = {t.micro_batch_size}*{dp}")
