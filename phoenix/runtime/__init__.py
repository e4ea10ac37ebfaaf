"""Process groups, device backends (cuda / cpu emulation), seeding, and the job's hold on its
run directory and its agent (run lock, start-up agreement, parent watchdog)."""

from phoenix.runtime.distributed import ParallelLayout, any_rank, init_runtime, shutdown_runtime
from phoenix.runtime.run_lock import RunLock, RunLockError, claim_run_dir
from phoenix.runtime.startup import on_every_rank

__all__ = ["ParallelLayout", "RunLock", "RunLockError", "any_rank", "claim_run_dir", "init_runtime",
           "on_every_rank", "shutdown_runtime"]
