"""Process groups, device backends (cuda / cpu emulation) and seeding."""

from phoenix.runtime.distributed import ParallelLayout, init_runtime, shutdown_runtime

__all__ = ["ParallelLayout", "init_runtime", "shutdown_runtime"]
