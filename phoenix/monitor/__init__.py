"""Training observability: console progress, TensorBoard scalars, per-layer norms."""

from phoenix.monitor.console import ConsoleLogger
from phoenix.monitor.norms import NormMonitor
from phoenix.monitor.tensorboard import TensorBoardLogger

__all__ = ["ConsoleLogger", "NormMonitor", "TensorBoardLogger"]
