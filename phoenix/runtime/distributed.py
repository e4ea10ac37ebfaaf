"""One object owns the parallel layout: degrees, ranks and megatron-core's groups.

:func:`init_runtime` is called once per process. It selects the device backend (NCCL on
CUDA, gloo plus the CPU emulation otherwise), initialises ``torch.distributed`` from the
torchrun environment, builds megatron-core's model-parallel groups and seeds every RNG.
Phoenix code receives the resulting :class:`ParallelLayout` instead of reaching for
``parallel_state`` getters: this package is the only one that touches megatron-core's
``parallel_state`` (megatron-core itself still uses it internally).
"""

from __future__ import annotations

import logging
import os
import random
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.distributed as dist

from phoenix.config import ConfigError, RunConfig
from phoenix.runtime.capabilities import check_capabilities

if TYPE_CHECKING:
    from megatron.core.process_groups_config import ProcessGroupCollection

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ParallelLayout:
    """Degrees, this process's coordinates in the TP x PP x DP grid, and its groups.

    The groups are megatron-core's own (the same objects ``parallel_state`` hands out),
    so a reduction over ``layout.dp_group`` is the reduction megatron does over its
    data-parallel group. Which group a reduction needs:

    * ``dp_group``: data parallel **without** context parallel (megatron's default
      ``get_data_parallel_group()``): ranks that hold different samples of the batch and
      the same sequence positions; the loss and per-sample reports are summed over it.
    * ``dp_cp_group``: data x context parallel (``with_context_parallel=True``): the ranks
      among which megatron's grad buffers and the distributed optimizer are sharded.
      Equal to ``dp_group`` while ``parallel.context`` is 1.
    * ``tp_group`` (tensor), ``pp_group`` (pipeline), ``mp_group`` (model parallel:
      TP x PP), ``cp_group`` (context), ``ep_group`` (expert model parallel; ``None`` when
      megatron did not build one).
    """

    world_size: int
    rank: int
    tp_size: int
    pp_size: int
    dp_size: int
    tp_rank: int
    pp_rank: int
    dp_rank: int
    device: torch.device
    pg_collection: ProcessGroupCollection
    """Every megatron group, for megatron APIs that take ``pg_collection``."""
    tp_group: dist.ProcessGroup
    pp_group: dist.ProcessGroup
    mp_group: dist.ProcessGroup
    dp_group: dist.ProcessGroup
    dp_cp_group: dist.ProcessGroup
    cp_group: dist.ProcessGroup | None = None
    ep_group: dist.ProcessGroup | None = None
    vp_size: int = 1
    """Model chunks per pipeline rank (``parallel.virtual_pipeline``; 1: no interleaving)."""

    @property
    def dp_cp_size(self) -> int:
        """Size of ``dp_cp_group`` (``dp_size`` x context-parallel size)."""
        return dist.get_world_size(self.dp_cp_group)

    @property
    def dp_cp_rank(self) -> int:
        """This process's rank in ``dp_cp_group``."""
        return dist.get_rank(self.dp_cp_group)

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp_size - 1

    @property
    def is_logging_rank(self) -> bool:
        """The rank that writes TensorBoard and the console: last stage, TP 0, DP 0 (it
        holds the loss). Not always the last global rank: at PP=2 x DP=2 it is rank 2, at
        PP=1 rank 0 (phoenix.runtime.command.log_progress_from raises its log level)."""
        return self.is_last_stage and self.tp_rank == 0 and self.dp_rank == 0

    def describe(self) -> str:
        ep = dist.get_world_size(self.ep_group) if self.ep_group is not None else 1
        return (f"world={self.world_size} tp={self.tp_size} pp={self.pp_size} "
                + (f"vp={self.vp_size} " if self.vp_size > 1 else "") + f"dp={self.dp_size} "
                + (f"ep={ep} " if ep > 1 else "") + f"device={self.device.type}")

    def chunk_is_first(self, vp_stage: int) -> bool:
        """Whether model chunk ``vp_stage`` of this rank holds the embedding (megatron's
        ``is_pipeline_first_stage(ignore_virtual=False, vp_stage=...)``)."""
        return self.is_first_stage and vp_stage == 0

    def chunk_is_last(self, vp_stage: int) -> bool:
        """Whether model chunk ``vp_stage`` of this rank holds the output layer and loss."""
        return self.is_last_stage and vp_stage == self.vp_size - 1


def _init_process_group(device: str, timeout_minutes: int) -> None:
    if dist.is_initialized():
        return
    # torchrun sets these; a plain `python -m phoenix.train` is a world of one.
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in os.environ:
        from phoenix.runtime.ports import free_port

        os.environ["MASTER_PORT"] = str(free_port())
    from phoenix.runtime.strict_group import world_backend

    dist.init_process_group(backend=world_backend(device),
                            timeout=timedelta(minutes=timeout_minutes))


def any_rank(flag: bool) -> bool:
    """Collective over the whole world: True on every rank when ``flag`` is True on any.

    The tensor lives on the run's device (the GPU under NCCL, the emulated GPU on the cpu
    backend), as the world group needs."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return bool(flag)
    t = torch.tensor([1.0 if flag else 0.0], device=_world_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def max_over_ranks(value: float) -> float:
    """Collective over the whole world: the largest of every rank's ``value``."""
    return _reduce(value, dist.ReduceOp.MAX)


def sum_over_ranks(value: float) -> float:
    """Collective over the whole world: the sum of every rank's ``value`` (float64: exact
    for integers below 2**53, e.g. byte counts)."""
    return _reduce(value, dist.ReduceOp.SUM)


def _reduce(value: float, op) -> float:
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return value
    t = torch.tensor([float(value)], dtype=torch.float64, device=_world_device())
    dist.all_reduce(t, op=op)
    return t.item()


def _world_device() -> torch.device:
    """The device of the world group's tensors: this rank's GPU under NCCL, else the cpu
    backend's emulated GPU (a host tensor would fail the strict device mode)."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    from phoenix.runtime.device_tracking import DEVICE

    return DEVICE


def seed_everything(seed: int, pp_rank: int) -> None:
    """Seed python/numpy/torch and megatron's model-parallel CUDA RNG tracker.

    As in Megatron-LM, each pipeline stage gets its own seed so that stages do not draw
    identical dropout masks; TP ranks are separated by the tracker itself.
    """
    from megatron.core import tensor_parallel

    seed = seed + 100 * pp_rank
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)


def init_runtime(cfg: RunConfig) -> ParallelLayout:
    """Initialise the device backend, process groups and RNGs for this process."""
    from phoenix.runtime.watchdog import exit_with_parent, helpers_die_with_this_process

    exit_with_parent()  # under torchrun: before the rendezvous, which may block
    helpers_die_with_this_process()
    check_capabilities(cfg)  # before any process group: the same refusals as --dry-run
    device = cfg.runtime.device
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("runtime.device: 'cuda' but no GPU is visible to this process "
                          "(CUDA_VISIBLE_DEVICES, driver); set runtime.device=cpu to run on the CPU")
    if device == "cpu":  # before megatron is imported: its import-time checks look at CUDA
        from phoenix.runtime import cpu_backend

        cpu_backend.enable()
    from megatron.core import parallel_state as ps
    from megatron.core.process_groups_config import ProcessGroupCollection

    from phoenix.runtime.device_tracking import DEVICE

    if device == "cuda":  # also when the caller (e.g. a test harness) made the world group
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    _init_process_group(device, cfg.runtime.distributed_timeout_minutes)
    world_size = dist.get_world_size()
    cfg.validate_layout(world_size)
    if not ps.model_parallel_is_initialized():
        ps.initialize_model_parallel(
            tensor_model_parallel_size=cfg.parallel.tensor,
            pipeline_model_parallel_size=cfg.parallel.pipeline,
            virtual_pipeline_model_parallel_size=cfg.parallel.virtual_pipeline,
            context_parallel_size=cfg.parallel.context,
            expert_model_parallel_size=cfg.parallel.expert,
            expert_tensor_parallel_size=cfg.parallel.expert_tensor,  # None: = tensor
            distributed_timeout_minutes=cfg.runtime.distributed_timeout_minutes,
        )
    layout = ParallelLayout(
        world_size=world_size,
        rank=dist.get_rank(),
        tp_size=ps.get_tensor_model_parallel_world_size(),
        pp_size=ps.get_pipeline_model_parallel_world_size(),
        dp_size=ps.get_data_parallel_world_size(),
        tp_rank=ps.get_tensor_model_parallel_rank(),
        pp_rank=ps.get_pipeline_model_parallel_rank(),
        dp_rank=ps.get_data_parallel_rank(),
        device=torch.device("cuda", torch.cuda.current_device()) if device == "cuda"
        else DEVICE,
        pg_collection=ProcessGroupCollection.use_mpu_process_groups(),
        tp_group=ps.get_tensor_model_parallel_group(),
        pp_group=ps.get_pipeline_model_parallel_group(),
        mp_group=ps.get_model_parallel_group(),
        dp_group=ps.get_data_parallel_group(),
        dp_cp_group=ps.get_data_parallel_group(with_context_parallel=True),
        cp_group=ps.get_context_parallel_group(check_initialized=False),
        ep_group=ps.get_expert_model_parallel_group(check_initialized=False),
        vp_size=cfg.parallel.chunks,
    )
    seed_everything(cfg.train.seed, layout.pp_rank)
    if cfg.parallel.tp_comm_overlap:  # CUDA with TE only (check_capabilities)
        from phoenix.runtime.tp_overlap import initialize_userbuffers

        initialize_userbuffers(cfg)
    return layout


def shutdown_runtime() -> None:
    """Tear down megatron's groups and the process group (tests reuse processes)."""
    if not dist.is_initialized():
        return  # e.g. a dry run: nothing was started, and megatron need not be imported
    from megatron.core import parallel_state as ps

    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
