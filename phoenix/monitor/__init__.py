"""Training observability: console progress and TensorBoard scalars."""

from phoenix.monitor.console import ConsoleLogger
from phoenix.monitor.tensorboard import TensorBoardLogger

__all__ = ["ConsoleLogger", "TensorBoardLogger"]
