"""Process groups, device backends (cuda / cpu emulation) and seeding."""

from phoenix.runtime.distributed import ParallelLayout, any_rank, init_runtime, shutdown_runtime

__all__ = ["ParallelLayout", "any_rank", "init_runtime", "shutdown_runtime"]
