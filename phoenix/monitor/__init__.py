"""Training observability: console progress, TensorBoard scalars, per-layer norms."""

from phoenix.monitor.console import ConsoleLogger
from phoenix.monitor.dataset_loss import DatasetLossMonitor
from phoenix.monitor.norms import NormMonitor
from phoenix.monitor.spikes import SpikeMonitor
from phoenix.monitor.tensorboard import TensorBoardLogger
from phoenix.monitor.throughput import ThroughputMonitor

__all__ = ["ConsoleLogger", "DatasetLossMonitor", "NormMonitor", "SpikeMonitor",
           "TensorBoardLogger", "ThroughputMonitor"]
