"""The ``logging`` section: console / TensorBoard cadence, per-layer norms, histograms, spike
detection."""

from __future__ import annotations

import importlib.util
import math
from dataclasses import dataclass, field
from typing import Any, Optional

from phoenix.config.typed import ConfigError, positive


@dataclass(kw_only=True)
class SpikeConfig:
    """Loss / grad-norm spike detection (``logging.spikes``); see phoenix.monitor.spikes."""

    enabled: bool = False
    window: int = 100
    """Trailing steps whose mean/std define "normal"."""
    min_steps: int = 20
    """No detection until the window holds this many values (warm-up; also after a resume)."""
    loss_sigma: Optional[float] = 5.0
    """Loss spike: loss > mean + loss_sigma * std of the window (null: loss not checked)."""
    grad_norm_sigma: Optional[float] = 5.0
    """Grad-norm spike: same with grad_norm_sigma (null: not checked). Logged only."""
    rel_std_floor: float = 0.0
    """The std used is at least rel_std_floor * |mean| (guards a nearly constant series)."""
    exclude_spikes: bool = True
    """Keep the values of flagged steps out of the window."""
    skip_step: bool = False
    """Skip the optimizer update of a step whose loss spikes (grad-norm spikes are only logged)."""
    top_samples: int = 10
    """Samples with the highest per-sample loss listed in a spike record."""
    top_layers: int = 5
    """Layers with the largest grad norm listed (when the NormMonitor logged the step)."""

    def __post_init__(self):
        if self.window < 2:
            raise ConfigError(f"spikes.window: must be >= 2, got {self.window}")
        if not 2 <= self.min_steps <= self.window:
            raise ConfigError(f"spikes.min_steps: must be in [2, window={self.window}], "
                              f"got {self.min_steps}")
        for name in ("loss_sigma", "grad_norm_sigma"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and value > 0):
                raise ConfigError(f"spikes.{name}: must be > 0 (or null to disable), got {value}")
        if not (math.isfinite(self.rel_std_floor) and self.rel_std_floor >= 0):
            raise ConfigError(f"spikes.rel_std_floor: must be >= 0, got {self.rel_std_floor}")
        if self.top_samples < 0 or self.top_layers < 0:
            raise ConfigError("spikes.top_samples and spikes.top_layers must be >= 0")
        if self.skip_step and self.loss_sigma is None:
            raise ConfigError("spikes.skip_step: needs loss_sigma (only loss spikes skip a step)")


@dataclass(kw_only=True)
class WandbConfig:
    """Weights & Biases as a second sink beside TensorBoard (phoenix.monitor.wandb_sink):
    the same tags at the same steps, the resolved config as the W&B run's config. Needs
    the optional ``wandb`` package."""

    project: str
    """W&B project (``wandb.init(project=...)``)."""
    entity: Optional[str] = None
    """W&B team or user (default: the logged-in user's default entity)."""
    name: Optional[str] = None
    """Display name of the W&B run (default: the config's ``name``)."""
    mode: str = "online"
    """``online``, ``offline`` (files only; ``wandb sync`` uploads them later) or
    ``disabled``."""
    dir: Optional[str] = None
    """Where W&B writes its files (a ``wandb/`` folder; default: ``output_dir``)."""
    tags: list[str] = field(default_factory=list)

    def __post_init__(self):
        if not isinstance(self.project, str) or not self.project:
            raise ConfigError("wandb.project: a W&B project name is needed")
        if self.mode not in ("online", "offline", "disabled"):
            raise ConfigError(f"wandb.mode: {self.mode!r} is not one of online, offline, disabled")
        # Refused when the config is read (and by --dry-run), not at the first log.
        if importlib.util.find_spec("wandb") is None:
            raise ConfigError("logging.wandb: the wandb package is not installed (pip install "
                              "wandb); or remove logging.wandb")


@dataclass(kw_only=True)
class HistogramConfig:
    """Weight and gradient histograms in TensorBoard (``logging.histograms``; see
    phoenix.monitor.histograms): ``param_hist/<key>`` and ``grad_hist/<key>`` of the
    parts ``patterns`` select, over the full (unsharded) tensors. Off by default."""

    interval: int = 0
    """Every N optimizer steps (and the run's last step); 0: off. A written step costs a
    few reads of the selected parts' owned elements, two all-reduces and two host
    synchronisations."""
    patterns: list[str] = field(default_factory=list)
    """Which parts, as shell-style patterns (fnmatch; ``*`` also crosses ``/``) over the
    per-layer norm keys: ``embedding``, ``output_layer``, ``final_norm``,
    ``layer_07/attention/qkv``, ``layer_07/attention/proj``, ``layer_07/mlp/fc1``,
    ``layer_07/mlp/fc2``, ``layer_07/norms``, MoE ``layer_07/mlp/router``,
    ``layer_07/mlp/expert_05/fc1`` ... (e.g. ``[embedding, output_layer, "layer_*/mlp/fc1"]``).
    One histogram per matched key (all its weights, e.g. a weight and its bias, together).
    A pattern that matches no key of the model is refused at start-up, naming the keys."""
    bins: int = 64
    """Equal-width buckets between the tensor's global min and max (1 to 512; W&B keeps
    at most 512)."""

    def __post_init__(self):
        if self.interval < 0:
            raise ConfigError(f"logging.histograms.interval: must be >= 0, got {self.interval}")
        if not isinstance(self.patterns, list) or not all(
                isinstance(p, str) and p for p in self.patterns):
            raise ConfigError(f"logging.histograms.patterns: a list of non-empty key patterns "
                              f"(e.g. [embedding, 'layer_*/mlp/fc1']), got {self.patterns!r}")
        if self.interval and not self.patterns:
            raise ConfigError("logging.histograms.patterns: which parts to histogram, e.g. "
                              "[embedding, output_layer, 'layer_*/mlp/fc1'] (none given)")
        if not 1 <= self.bins <= 512:
            raise ConfigError(f"logging.histograms.bins: must be in [1, 512], got {self.bins}")


BUILTIN_CALLBACKS = ("console", "train_scalars", "tensorboard", "wandb", "norms",
                     "optimizer_state_norms", "histograms", "dataset_loss", "moe", "heatmaps",
                     "throughput", "spikes", "eval", "manual_gc")
"""The names of the trainer's own callbacks (phoenix.train.callbacks), for
``logging.callbacks``."""


@dataclass(kw_only=True)
class LoggingConfig:
    log_interval: int = 10
    """Console and TensorBoard scalars every N steps (and the run's last step); the
    default of every monitor's interval below. 10, as torchtitan: a written step costs a
    few host synchronisations and the monitors' reductions, a step that writes nothing
    costs about five host synchronisations in all (phoenix.testing.host_syncs), so at 10
    the monitors stay well under 1% of an 8B step (README, "The lean step")."""
    tensorboard: bool = True
    wandb: Optional[WandbConfig] = None
    """Also log to Weights & Biases (``{project, entity, name, mode, dir, tags}``)."""
    norm_interval: Optional[int] = None
    """Per-layer grad/param/update norms in TensorBoard every N steps (default: every
    log_interval steps; 0: off). Costs one fp32 copy of this rank's owned weights and one
    all-reduce on those steps only."""
    optimizer_state_norms: int = 0
    """Per-layer norms of Adam's state in TensorBoard every N steps (and the run's last
    step; 0, the default: off): ``adam_m_norm/<key>`` (first moment, ``exp_avg``),
    ``adam_v_norm/<key>`` (second moment, ``exp_avg_sq``) and ``adam_direction_norm/<key>``
    (the bias-corrected ``m̂ / (√v̂ + ε)`` the step applied, before the LR), with the keys
    of the grad norms (phoenix.monitor.optimizer_state). An interval of its own, off by
    default, rather than following norm_interval: it is a diagnosis tool that reads the
    whole optimizer state (twice the fp32 weights) on the steps it logs, and a run turns
    it on when it needs it (e.g. ``logging.optimizer_state_norms=10``). Costs about 40
    bytes of memory traffic per owned parameter and one all-reduce on those steps only."""

    histograms: HistogramConfig = field(default_factory=HistogramConfig)
    """Weight and gradient histograms of chosen parts (``{interval, patterns, bins}``;
    off by default; see phoenix.monitor.histograms)."""
    dataset_loss_interval: Optional[int] = None
    """Per-dataset loss/tokens in TensorBoard every N steps (default log_interval; 0: off)."""
    throughput_interval: Optional[int] = None
    """3_throughput/* (TFLOP/s, MFU, time split) and memory/* every N steps (default
    log_interval; 0: off)."""
    moe_interval: Optional[int] = None
    """MoE routing in TensorBoard (``moe/*``: aux/z losses, tokens per expert, imbalance,
    router entropy, dropped tokens; see phoenix.monitor.moe) every N steps (default
    log_interval; 0: off). Only with model.moe; costs one small all-reduce on those steps."""
    heatmap_every: int = 10
    """Per-layer norms (layer x step) and MoE load (expert x step, layer x expert) as
    heatmap images in TensorBoard (``4_heatmaps/*``) and PNG files in
    ``<output_dir>/heatmaps/``, rendered at every N-th step that logs per-layer norms or
    MoE load, and at the run's last step (0: off). 10: with the default intervals, every
    100 steps; a render costs milliseconds on the host and nothing on the device (see
    phoenix.monitor.heatmap)."""
    peak_tflops: Optional[float] = None
    """Per-GPU peak TFLOP/s for 3_throughput/mfu; default from the GPU name (bf16 dense,
    e.g. H100/H200 989); on CPU MFU is logged only when this is set."""
    sync_timers: bool = False
    """Synchronise the device at the step's phase boundaries (data, forward-backward,
    optimizer, callbacks), so ``time/*`` splits are exact on a GPU rather than the time
    the host took to queue the work (as Megatron-LM's ``--barrier-with-L1-time``). Costs
    up to three device synchronisations a step; off by default."""
    callbacks: dict[str, Any] = field(default_factory=dict)
    """The run's callbacks by name: ``false`` turns a built-in off (one of
    ``BUILTIN_CALLBACKS``, e.g. ``{norms: false}``); a mapping with ``class:
    "package.module:Name"`` and keyword arguments adds the user's own under that name
    (constructed once per rank, given the arguments; it must subclass
    phoenix.monitor.base.Callback). OLMo-core's named callbacks."""
    spikes: SpikeConfig = field(default_factory=SpikeConfig)
    """Loss / grad-norm spike detection, spikes.jsonl with the batch's provenance, and
    optionally skipping the update on a loss spike (see phoenix.monitor.spikes)."""

    def __post_init__(self):
        positive("logging", log_interval=self.log_interval)
        for name, spec in self.callbacks.items():
            if spec is False:
                if name not in BUILTIN_CALLBACKS:
                    raise ConfigError(f"logging.callbacks.{name}: false turns off a built-in "
                                      f"callback, one of {', '.join(BUILTIN_CALLBACKS)}")
            elif not (isinstance(spec, dict) and isinstance(spec.get("class"), str)
                      and spec["class"].count(":") == 1):
                raise ConfigError(f"logging.callbacks.{name}: false, or a mapping with class: "
                                  f"'package.module:Name' and its keyword arguments")
            elif name in BUILTIN_CALLBACKS:
                raise ConfigError(f"logging.callbacks.{name}: the name of a built-in callback; "
                                  f"give yours another name (or turn the built-in off)")
        for key in ("norm_interval", "dataset_loss_interval", "throughput_interval",
                    "moe_interval"):
            if getattr(self, key) is None:
                setattr(self, key, self.log_interval)
            if getattr(self, key) < 0:
                raise ConfigError(f"logging.{key}: must be >= 0, got {getattr(self, key)}")
        if self.optimizer_state_norms < 0:
            raise ConfigError(f"logging.optimizer_state_norms: must be >= 0 (an interval in "
                              f"steps; 0: off), got {self.optimizer_state_norms}")
        if self.heatmap_every < 0:
            raise ConfigError(f"logging.heatmap_every: must be >= 0, got {self.heatmap_every}")
        positive("logging", peak_tflops=self.peak_tflops)
