"""Optimizer and learning-rate schedule."""

from phoenix.optim.builder import build_optimizer, build_scheduler

__all__ = ["build_optimizer", "build_scheduler"]
