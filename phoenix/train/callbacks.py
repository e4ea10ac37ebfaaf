"""The run's callbacks, by name (OLMo-core's named callbacks).

:func:`run_callbacks` builds the trainer's own side concerns from the config, each under
a stable name (``phoenix.config.monitoring.BUILTIN_CALLBACKS``) and given its settings at
construction, then applies ``logging.callbacks``: ``false`` turns a built-in off, a
``class: "package.module:Name"`` mapping adds the user's own. Every callback carries its
name (``callback.name``), so two of one class can be told apart in logs and tests.
"""

from __future__ import annotations

import importlib
from pathlib import Path

import yaml

from phoenix.config import ConfigError, RunConfig
from phoenix.eval.callback import EvalCallback
from phoenix.monitor import (
    ConsoleLogger,
    DatasetLossMonitor,
    HeatmapMonitor,
    MoEMonitor,
    NormMonitor,
    OptimizerStateNormMonitor,
    SpikeMonitor,
    TensorBoardLogger,
    ThroughputMonitor,
    TrainScalars,
)
from phoenix.monitor.base import Callback
from phoenix.monitor.histograms import HistogramMonitor
from phoenix.monitor.wandb_sink import WandbLogger
from phoenix.monitor.console import Cadence
from phoenix.monitor.tensorboard import tensorboard_dir
from phoenix.train.manual_gc import ManualGC


def builtin_callbacks(cfg: RunConfig, out_dir: Path, config_yaml: str) -> dict[str, Callback]:
    """The trainer's own callbacks that ``cfg`` turns on, by name. The monitors exist
    only with a sink (``logging.tensorboard`` or ``logging.wandb``: they write nowhere
    else)."""
    log = cfg.logging
    tb = log.tensorboard or log.wandb is not None
    try:
        tb_dir = tensorboard_dir(out_dir, cfg.name) if log.tensorboard else None
    except ValueError as e:
        raise ConfigError(f"name: {e}") from None
    names = [e.display_name for e in cfg.data.datasets]
    hist = log.histograms
    moe_on = bool(tb and log.moe_interval and cfg.model.moe is not None)
    found: dict[str, Callback | None] = {
        "console": ConsoleLogger(
            cfg.train.steps, log.log_interval,
            saves=Cadence(cfg.checkpoint.save_interval, cfg.checkpoint.save_at_end),
            evals=Cadence(cfg.eval.interval, cfg.eval.at_end) if cfg.eval else Cadence()),
        "train_scalars": TrainScalars(),
        "tensorboard": TensorBoardLogger(tb_dir, config_yaml) if log.tensorboard else None,
        "wandb": (WandbLogger(log.wandb, out_dir, cfg.name, yaml.safe_load(config_yaml))
                  if log.wandb is not None else None),
        "norms": NormMonitor(log.norm_interval) if tb and log.norm_interval else None,
        "optimizer_state_norms": (OptimizerStateNormMonitor(log.optimizer_state_norms)
                                  if tb and log.optimizer_state_norms else None),
        "histograms": (HistogramMonitor(hist.interval, hist.patterns, hist.bins)
                       if tb and hist.interval else None),
        "dataset_loss": (DatasetLossMonitor(log.dataset_loss_interval, names=names)
                         if tb and log.dataset_loss_interval else None),
        "moe": (MoEMonitor(log.moe_interval, moe=cfg.model.moe, num_layers=cfg.model.num_layers)
                if moe_on else None),
        "heatmaps": (HeatmapMonitor(log.heatmap_every, out_dir / "heatmaps")
                     if tb and log.heatmap_every
                     and (log.norm_interval or log.optimizer_state_norms or moe_on) else None),
        "throughput": (ThroughputMonitor(log.throughput_interval, log.peak_tflops,
                                         model=cfg.model, precision=cfg.train.precision)
                       if tb and log.throughput_interval else None),
        "spikes": SpikeMonitor(log.spikes, out_dir, names=names) if log.spikes.enabled else None,
        "eval": EvalCallback(cfg.eval) if cfg.eval is not None else None,
        "manual_gc": (ManualGC(cfg.train.manual_gc_interval)
                      if cfg.train.manual_gc_interval else None),
    }
    return {name: cb for name, cb in found.items() if cb is not None}


def user_callback(name: str, spec: dict) -> Callback:
    """Construct ``logging.callbacks.<name>``: ``spec["class"]`` is ``"module:Name"``, the
    other keys its keyword arguments. ConfigError naming the key when it cannot be
    imported, is not a Callback or refuses its arguments."""
    module_name, class_name = spec["class"].split(":")
    key = f"logging.callbacks.{name}"
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"{key}: cannot import {spec['class']}: {e}") from None
    if not (isinstance(cls, type) and issubclass(cls, Callback)):
        raise ConfigError(f"{key}: {spec['class']} is not a phoenix.monitor.base.Callback")
    try:
        return cls(**{k: v for k, v in spec.items() if k != "class"})
    except TypeError as e:
        raise ConfigError(f"{key}: {spec['class']}: {e}") from None


def run_callbacks(cfg: RunConfig, out_dir: Path, config_yaml: str) -> dict[str, Callback]:
    """The built-ins ``cfg`` turns on, less those ``logging.callbacks`` turns off, plus
    the user's, each with its ``name`` set."""
    callbacks = builtin_callbacks(cfg, out_dir, config_yaml)
    for name, spec in cfg.logging.callbacks.items():
        if spec is False:
            callbacks.pop(name, None)
        else:
            callbacks[name] = user_callback(name, spec)
    if "heatmaps" in callbacks and not callbacks.keys() & {"norms", "optimizer_state_norms", "moe"}:
        del callbacks["heatmaps"]  # it draws what those record: nothing without them
    for name, cb in callbacks.items():
        cb.name = name
    return callbacks
