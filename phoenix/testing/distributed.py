"""Run a function on N real processes (gloo on CPU) and collect what each returns.

Used by the multi-process tests: ``run_distributed(fn, world_size, *args)`` spawns
``world_size`` fresh processes with the torchrun environment set (free port, RANK,
WORLD_SIZE, LOCAL_RANK), calls ``fn(*args)`` in each, and returns the per-rank results.
A failure on any rank raises in the caller with that rank's traceback. Fresh processes
matter: megatron-core keeps its process groups in module globals.
"""

from __future__ import annotations

import os
import pickle
import tempfile
import traceback
from pathlib import Path

import torch.multiprocessing as mp

from phoenix.runtime.ports import free_port


def _entry(rank: int, fn, args, world_size: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size), OMP_NUM_THREADS="1")
    result_file = Path(out_dir) / f"rank_{rank}.pkl"
    try:
        result = fn(*args)
        payload = ("ok", result)
    except BaseException:
        payload = ("error", traceback.format_exc())
    finally:
        try:
            from phoenix.runtime import shutdown_runtime

            shutdown_runtime()
        except Exception:
            pass
    result_file.write_bytes(pickle.dumps(payload))
    if payload[0] == "error":
        raise SystemExit(1)


def run_distributed(fn, world_size: int, *args, timeout: float = 600.0) -> list:
    """Call ``fn(*args)`` on ``world_size`` spawned ranks; return results by rank."""
    with tempfile.TemporaryDirectory(prefix="phoenix-dist-") as out_dir:
        ctx = mp.start_processes(_entry, args=(fn, args, world_size, free_port(), out_dir),
                                 nprocs=world_size, join=False, start_method="spawn")
        errors, failed = [], None
        try:
            while not ctx.join(timeout=timeout):
                pass
        except mp.ProcessRaisedException as e:
            failed = e
        except mp.ProcessExitedException as e:
            failed = e
        finally:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
        results = []
        for rank in range(world_size):
            path = Path(out_dir) / f"rank_{rank}.pkl"
            if not path.exists():
                errors.append(f"rank {rank}: exited without a result")
                results.append(None)
                continue
            status, value = pickle.loads(path.read_bytes())
            if status == "error":
                errors.append(f"rank {rank}:\n{value}")
            results.append(value if status == "ok" else None)
        if errors or failed is not None:
            raise RuntimeError("distributed run failed:\n" + "\n".join(errors or [str(failed)]))
        return results
