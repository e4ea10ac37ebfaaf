"""Run a function on N real processes (gloo on CPU) and collect what each returns.

Used by the multi-process tests: ``run_distributed(fn, world_size, *args, backend="gloo")``
starts ``world_size`` fresh processes with the torchrun environment set (free port, RANK,
WORLD_SIZE, LOCAL_RANK), initialises the default process group with ``backend`` in each
(``nccl``: rank r on GPU r), calls ``fn(*args)`` and returns the per-rank results.
:func:`phoenix.runtime.init_runtime` inside ``fn`` keeps that world group and builds
megatron's groups on it, so the same test body runs on gloo here and on NCCL on GPUs. A
failure on any rank raises in the caller with that rank's traceback; the runtime is torn
down in ``finally``. Fresh processes matter: megatron-core keeps its process groups in
module globals.
"""

from __future__ import annotations

import os
import pickle
import tempfile
import traceback
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from phoenix.runtime.ports import free_port


BACKENDS = ("gloo", "nccl")


def _entry(rank: int, fn, args, world_size: int, port: int, out_dir: str, backend: str,
           timeout: float, environ: dict) -> None:
    os.environ.clear()  # the caller's environment now, not the fork server's at its start
    os.environ.update(environ)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size), OMP_NUM_THREADS="1")
    result_file = Path(out_dir) / f"rank_{rank}.pkl"
    try:
        if backend == "nccl":
            torch.cuda.set_device(rank)
        if backend == "gloo":  # phoenix_strict under PHOENIX_NCCL_STRICT=1
            from phoenix.runtime.strict_group import world_backend

            backend = world_backend("cpu")
        dist.init_process_group(backend=backend, rank=rank, world_size=world_size,
                                timeout=timedelta(seconds=timeout))
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


def run_distributed(fn, world_size: int, *args, backend: str = "gloo",
                    timeout: float = 600.0) -> list:
    """Call ``fn(*args)`` on ``world_size`` spawned ranks; return results by rank.

    ``backend``: of the world process group, ``gloo`` (CPU) or ``nccl`` (one GPU per
    rank; ``fn``'s config must then say ``runtime.device: cuda``). ``timeout``: seconds
    a collective of the world group may wait (also the interval of the join polls).
    """
    if backend not in BACKENDS:
        raise ValueError(f"run_distributed: backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "nccl" and torch.cuda.device_count() < world_size:
        raise RuntimeError(f"run_distributed: backend 'nccl' needs {world_size} GPUs, "
                           f"{torch.cuda.device_count()} visible")
    for attempt in range(_PORT_ATTEMPTS):
        try:
            return _spawn(fn, world_size, args, backend, timeout)
        except _PortTaken:
            if attempt == _PORT_ATTEMPTS - 1:
                raise RuntimeError(f"run_distributed: no free rendezvous port in "
                                   f"{_PORT_ATTEMPTS} attempts") from None


# The port is picked free, then bound by rank 0 a moment later; on a busy machine another
# process can take it in between. Only that failure (before ``fn`` runs) is retried.
_PORT_ATTEMPTS = 3


class _PortTaken(Exception):
    pass


PRELOAD = ("torch", "torch.distributed", "megatron.core", "megatron.core.models.gpt",
           "megatron.core.optimizer", "megatron.core.distributed",
           "megatron.core.pipeline_parallel", "megatron.core.dist_checkpointing")
"""What the fork server imports once, before it forks the ranks (about 4 s of imports a
process would otherwise repeat). Nothing of phoenix: its CPU emulation patches torch and
megatron in each rank, as in a process of its own (megatron reads the patched attributes
through their modules)."""


def _start_method(backend: str) -> str:
    """``forkserver`` on CPU: every rank is a fork of one server process that imported
    :data:`PRELOAD` (a fresh interpreter that ran no torch op, so no thread pool or process
    group is inherited; megatron's module globals are still unset), with the caller's
    current environment (:func:`_entry`). ``spawn`` for NCCL: CUDA is initialised only in
    fresh processes."""
    if backend == "nccl":
        return "spawn"
    import multiprocessing

    multiprocessing.set_forkserver_preload(list(PRELOAD))  # read when the server starts
    return "forkserver"


def _spawn(fn, world_size: int, args, backend: str, timeout: float) -> list:
    with tempfile.TemporaryDirectory(prefix="phoenix-dist-") as out_dir:
        ctx = mp.start_processes(_entry, args=(fn, args, world_size, free_port(), out_dir,
                                               backend, timeout, dict(os.environ)),
                                 nprocs=world_size, join=False, start_method=_start_method(backend))
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
        if errors and "EADDRINUSE" in errors[0] and "init_process_group" in errors[0]:
            raise _PortTaken()
        if errors or failed is not None:
            raise RuntimeError("distributed run failed:\n" + "\n".join(errors or [str(failed)]))
        return results
