"""The strict device mode's process groups: gloo that refuses host tensors as NCCL does.

With ``PHOENIX_NCCL_STRICT=1`` the cpu backend's world group is created with the
``phoenix_strict`` backend (:func:`world_backend`), and so is every group created from it
without an explicit backend (megatron's TP/PP/DP/EP groups, phoenix's own). Such a group
is gloo underneath, but every collective, point-to-point op and object collective first
checks its tensors: one labelled host (phoenix.runtime.device_tracking) fails with NCCL's
own error and the call site. Groups created explicitly with ``backend="gloo"``
(megatron's ``*_gloo`` groups for host-side optimizer state) stay plain gloo and take
host tensors, as they do on a GPU cluster.

Object collectives (``broadcast_object_list``, ``all_gather_object``) pick their tensors'
device from the group: a strict group reports ``cuda``, as an NCCL group does, so torch
makes them on the emulated GPU.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from phoenix.runtime import device_tracking

BACKEND = "phoenix_strict"

# Every ProcessGroup method through which torch.distributed's collectives reach a backend.
_OPS = ("allreduce", "allreduce_coalesced", "broadcast", "allgather", "_allgather_base",
        "allgather_coalesced", "allgather_into_tensor_coalesced", "all_gather_single",
        "all_gather_single_coalesced", "reduce", "reduce_scatter", "_reduce_scatter_base",
        "reduce_scatter_single", "reduce_scatter_single_coalesced",
        "reduce_scatter_tensor_coalesced", "alltoall", "alltoall_base", "all_to_all_single",
        "gather", "scatter", "send", "recv", "recv_anysource", "barrier", "monitored_barrier")


class HostTensorError(RuntimeError):
    """A host tensor reached a group that serves only CUDA tensors (NCCL's error)."""


def _check(op: str, args) -> None:
    for a in args:
        tensors = a if isinstance(a, (list, tuple)) else [a]
        for t in tensors:
            if isinstance(t, (list, tuple)):
                _check(op, [t])
            elif torch.is_tensor(t) and device_tracking.is_host(t):
                raise HostTensorError(
                    f"No backend type associated with device type cpu: {op} of a host tensor "
                    f"{tuple(t.shape)} {t.dtype} on a group that serves CUDA tensors only "
                    f"(NCCL), at {device_tracking.call_site()}; make it on the run's device (layout.device)")


class StrictGroup(dist.ProcessGroup):
    """A gloo process group that refuses host tensors (module docstring)."""

    def __init__(self, store, rank: int, size: int, timeout):
        super().__init__(rank, size)
        # A whole gloo ProcessGroup underneath (not only its backend): its C++ side carries
        # the coalesced and single-tensor collectives megatron's grad buffers use.
        gloo = dist.ProcessGroupGloo(store, rank, size, timeout)
        self._gloo = dist.ProcessGroup(store, rank, size)
        self._gloo._set_default_backend(dist.ProcessGroup.BackendType.GLOO)
        self._gloo._register_backend(torch.device("cpu"), dist.ProcessGroup.BackendType.GLOO, gloo)

    @property
    def _device_types(self):  # what an NCCL group reports: object collectives go to cuda
        return [torch.device("cuda")]

    def getBackendName(self) -> str:  # noqa: N802 (torch's name)
        return BACKEND

    @property
    def name(self) -> str:
        return BACKEND

    def shutdown(self) -> None:
        pass


def _forward(op: str):
    def method(self, *args, **kwargs):
        _check(op, (*args, *kwargs.values()))
        return getattr(self._gloo, op)(*args, **kwargs)

    method.__name__ = op
    return method


for _op in _OPS:
    setattr(StrictGroup, _op, _forward(_op))


def _create(store, rank, size, timeout):
    from phoenix.runtime import cpu_backend

    cpu_backend.enable()  # object collectives make "cuda" tensors: the emulation maps them
    return StrictGroup(store, rank, size, timeout)


def world_backend(device: str) -> str:
    """The backend of the world group for ``runtime.device``: ``nccl`` on CUDA; on the
    CPU ``phoenix_strict`` under ``PHOENIX_NCCL_STRICT=1`` (registered here), else gloo."""
    if device == "cuda":
        return "nccl"
    if not device_tracking.strict_enabled():
        return "gloo"
    if BACKEND.upper() not in dist.Backend._plugins:
        dist.Backend.register_backend(BACKEND, _create, devices=["cpu", "cuda"])
    return BACKEND
