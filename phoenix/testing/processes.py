"""Real training processes for the run-safety tests: ``python -m phoenix.train`` and torchrun
agents started in sessions of their own with a log file each, process-tree clean-up, and
the functions the multi-process start-up tests run inside their ranks."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
LAUNCH_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK",
               "MASTER_ADDR", "MASTER_PORT")


def start(args: list, log: str | Path, cwd: str | Path | None = None) -> subprocess.Popen:
    """Start ``python ARGS`` in its own session (so no helper it leaves holds our pipes),
    with stdout and stderr in ``log``."""
    env = {k: v for k, v in os.environ.items()
           if k not in LAUNCH_ENV and not k.startswith("TORCHELASTIC_")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), PYTHONWARNINGS="ignore")
    with open(log, "w") as out:
        return subprocess.Popen([sys.executable, *map(str, args)], cwd=cwd or REPO, env=env,
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def torchrun_args(nproc: int, *, nnodes: int = 1, node_rank: int = 0, port: int | None = None,
                  run_id: str = "phoenix-test") -> list[str]:
    """``-m torch.distributed.run`` options: standalone, or one of ``nnodes`` "nodes" with a
    c10d rendezvous on 127.0.0.1:``port``."""
    args = ["-m", "torch.distributed.run", "--nproc-per-node", str(nproc)]
    if nnodes == 1:
        return [*args, "--standalone"]
    return [*args, "--nnodes", str(nnodes), "--node-rank", str(node_rank), "--rdzv-backend", "c10d",
            "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", run_id]


def alive(pid: int) -> bool:
    """``pid`` exists and is not a zombie."""
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def wait_until(predicate, timeout: float, interval: float = 0.2) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


def kill_tree(proc: subprocess.Popen, extra_pids=()) -> None:
    """SIGKILL ``proc``, its descendants (whatever session they are in), its process group
    and ``extra_pids``; then reap ``proc``."""
    import psutil

    pids = set(extra_pids)
    try:
        pids |= {c.pid for c in psutil.Process(proc.pid).children(recursive=True)}
    except psutil.NoSuchProcess:
        pass
    for pid in [proc.pid, *pids]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait(timeout=30)


# -- inside ranks of phoenix.testing.distributed.run_distributed --------------------------------

def _init_gloo() -> int:
    import torch.distributed as dist

    from phoenix.runtime.strict_group import world_backend

    if not dist.is_initialized():
        dist.init_process_group(world_backend("cpu"))
    return dist.get_rank()


def fail_on_rank(failing: int, message: str) -> str:
    """``on_every_rank`` of a check that raises ConfigError(message) on rank ``failing``;
    returns what this rank raised, as ``'Type: message'``."""
    from phoenix.config import ConfigError
    from phoenix.runtime import on_every_rank

    rank = _init_gloo()

    def check():
        if rank == failing:
            raise ConfigError(message)
        return rank

    try:
        on_every_rank(check)
    except Exception as e:
        return f"{type(e).__name__}: {e}"
    return "no error"


def save_writes_failing_on_one_rank(cases: list[tuple[int, int]]) -> list[str]:
    """For each (failing rank, errno): ``phoenix.checkpoint.sharded_save.agreed`` of a write
    that raises OSError(errno) on that rank only; returns what this rank raised in each
    case, as ``'SaveFailed: no_space=... own=...'``."""
    from phoenix.checkpoint.sharded_save import SaveFailed, agreed

    rank, out = _init_gloo(), []
    for failing, error_number in cases:
        def write():
            if rank == failing:
                raise OSError(error_number, os.strerror(error_number))

        try:
            agreed(write)
            out.append("no error")
        except SaveFailed as e:
            out.append(f"SaveFailed: no_space={e.no_space} own={e.error is not None}")
    return out


def views_of_rank_dirs(root: str, shared: bool) -> list:
    """Every rank's :func:`~phoenix.runtime.startup.dir_views` of ``root/cache`` (shared)
    or of ``root/rank<r>/cache`` (each rank its own directory); plain tuples."""
    from phoenix.runtime.startup import dir_views

    rank = _init_gloo()
    directory = Path(root) / ("cache" if shared else f"rank{rank}/cache")
    return [(v.rank, v.path, v.sees) for v in dir_views(directory, wait=1.0)]
