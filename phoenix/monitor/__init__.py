"""Training observability: the callback base and metrics path, console progress, the
TensorBoard sink, training scalars, per-layer norms (gradients, weights, updates, Adam
state) and their heatmaps, weight/gradient histograms, per-dataset loss, throughput,
spikes, MoE routing."""

from phoenix.monitor.base import Callback, MetricsCollector, StepMetrics, is_logging_step
from phoenix.monitor.console import ConsoleLogger
from phoenix.monitor.dataset_loss import DatasetLossMonitor
from phoenix.monitor.heatmap import HeatmapMonitor
from phoenix.monitor.histograms import HistogramMonitor
from phoenix.monitor.moe import MoEMonitor
from phoenix.monitor.norms import NormMonitor
from phoenix.monitor.optimizer_state import OptimizerStateNormMonitor
from phoenix.monitor.spikes import SpikeMonitor
from phoenix.monitor.tensorboard import TensorBoardLogger
from phoenix.monitor.throughput import ThroughputMonitor
from phoenix.monitor.train_scalars import TrainScalars

__all__ = ["Callback", "ConsoleLogger", "DatasetLossMonitor", "HeatmapMonitor",
           "HistogramMonitor", "MetricsCollector", "MoEMonitor", "NormMonitor", "OptimizerStateNormMonitor",
           "SpikeMonitor", "StepMetrics", "TensorBoardLogger", "ThroughputMonitor",
           "TrainScalars", "is_logging_step"]
