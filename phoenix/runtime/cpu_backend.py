"""CPU emulation of the CUDA touchpoints megatron-core relies on.

megatron-core assumes a GPU in a handful of places: literal ``device="cuda"`` and
``torch.cuda.current_device()`` in tensor factories, ``Tensor.cuda()``, string checks
against ``'torch.cuda.FloatTensor'``, the CUDA RNG (``torch.cuda.manual_seed`` and the
model-parallel RNG tracker), streams/events/synchronize, and one missing-TE fallback
in the MoE router. This module makes those work on CPU so that every phoenix feature,
TP/PP/DP included, runs and is tested with gloo on a machine without a GPU.

It is entered once per process (:func:`enable`) before megatron-core builds anything,
and it refuses to activate when CUDA is available, so it can never change a GPU run.

The emulated "CUDA generator" *is* the CPU default generator: on CPU every random op
(dropout, init) draws from it, so the model-parallel RNG tracker's ``fork()`` swaps the
state the ops actually use, exactly as it swaps the device generator on a GPU.
"""

from __future__ import annotations

import contextlib
import logging
import types

import torch
from torch.overrides import TorchFunctionMode

from phoenix.runtime import device_tracking
from phoenix.runtime.device_tracking import DEVICE

log = logging.getLogger(__name__)

_CPU = DEVICE  # the emulated CUDA device (phoenix.runtime.device_tracking)
_ENABLED = False
_TRACK = False  # the strict device mode: label tensors host / cuda


def _to_cpu_device(device):
    """Map any CUDA device spec (str, int ordinal, torch.device) to the CPU device."""
    if device is None:
        return None
    if isinstance(device, int):  # an ordinal means a CUDA device to torch
        return _CPU
    if isinstance(device, str):
        return _CPU if device.startswith("cuda") else device
    if isinstance(device, torch.device) and device.type == "cuda":
        return _CPU
    return device


_TENSOR_TYPE_NAMES = {
    torch.float32: "torch.cuda.FloatTensor",
    torch.float16: "torch.cuda.HalfTensor",
    torch.bfloat16: "torch.cuda.BFloat16Tensor",
    torch.float64: "torch.cuda.DoubleTensor",
}


class _CudaToCpuMode(TorchFunctionMode):
    """Rewrites CUDA devices to CPU in every torch call made while it is active."""

    def __torch_function__(self, func, types_, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        device = kwargs.get("device")
        if device is not None:
            kwargs["device"] = _to_cpu_device(device)
        to_device = None
        if func is torch.Tensor.to:
            if len(args) > 1 and not torch.is_tensor(args[1]) and not isinstance(args[1], torch.dtype):
                to_device = args[1]
                args = (args[0], _to_cpu_device(args[1])) + tuple(args[2:])
            elif device is not None:
                to_device, device = device, None
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            # megatron's distributed optimizer dispatches on the CUDA type string.
            name = _TENSOR_TYPE_NAMES.get(args[0].dtype)
            if name is not None:
                return name
        if func is torch.Tensor.cuda:
            run = lambda: args[0]  # noqa: E731 (already on the emulated device)
        else:
            run = lambda: func(*args, **kwargs)  # noqa: E731
        if not _TRACK:
            return run()
        return device_tracking.track(func, args, kwargs, device, to_device, run)


class _Event:
    """Stand-in for ``torch.cuda.Event``: timing falls back to wall-clock."""

    def __init__(self, *args, **kwargs):
        self._t = None

    def record(self, *args, **kwargs):
        import time

        self._t = time.perf_counter()

    def synchronize(self):
        pass

    def wait(self, *args, **kwargs):
        pass

    def query(self):
        return True

    def elapsed_time(self, other):
        return (other._t - self._t) * 1000.0


class _Stream:
    def __init__(self, *args, **kwargs):
        pass

    def synchronize(self):
        pass

    def wait_stream(self, *args, **kwargs):
        pass

    def wait_event(self, *args, **kwargs):
        pass

    def record_event(self, event=None):
        return event or _Event()


def _patch_torch_cuda() -> None:
    cuda = torch.cuda
    gen = torch.default_generator

    def get_rng_state(device="cuda"):
        return gen.get_state()

    def set_rng_state(state, device="cuda"):
        gen.set_state(state)

    def manual_seed(seed):
        # Must not call torch.manual_seed: that calls back into torch.cuda.manual_seed_all.
        gen.manual_seed(int(seed))

    patches = {
        "get_rng_state": get_rng_state,
        "set_rng_state": set_rng_state,
        "manual_seed": manual_seed,
        "manual_seed_all": manual_seed,
        # The CPU device itself, not the ordinal 0: the TorchFunctionMode below is not
        # active inside autograd's backward, where megatron still allocates with
        # ``device=torch.cuda.current_device()`` (the EP all-to-all's and the sequence-
        # parallel all-gather's backward); an ordinal there would mean a CUDA device.
        "current_device": lambda: _CPU,
        "set_device": lambda *a, **k: None,
        "device_count": lambda: 1,
        "synchronize": lambda *a, **k: None,
        "empty_cache": lambda: None,
        "memory_allocated": lambda *a, **k: 0,
        "max_memory_allocated": lambda *a, **k: 0,
        "memory_reserved": lambda *a, **k: 0,
        "max_memory_reserved": lambda *a, **k: 0,
        "reset_peak_memory_stats": lambda *a, **k: None,
        "Event": _Event,
        "Stream": _Stream,
        "current_stream": lambda *a, **k: _Stream(),
        "default_stream": lambda *a, **k: _Stream(),
        "stream": lambda *a, **k: contextlib.nullcontext(),
    }
    for name, fn in patches.items():
        setattr(cuda, name, fn)
    cuda.random.get_rng_state = get_rng_state
    cuda.random.set_rng_state = set_rng_state
    cuda.nvtx = types.SimpleNamespace(
        range_push=lambda *a, **k: None,
        range_pop=lambda *a, **k: None,
        range=lambda *a, **k: contextlib.nullcontext(),
        mark=lambda *a, **k: None,
    )


def _patch_megatron() -> None:
    from megatron.core.tensor_parallel import random as mrandom

    mrandom._get_cuda_rng_state = lambda device="cuda", clone=False, graph_safe=False: (
        torch.default_generator.get_state()
    )
    mrandom._set_cuda_rng_state = lambda new_state, device=-1, graph_safe=False: (
        torch.default_generator.set_state(new_state)
    )
    # The MoE router references te_general_gemm without defining it when TE is absent;
    # None selects its torch path.
    from megatron.core.transformer.moe import moe_utils

    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None
    # Expert parallelism: the all-to-all dispatcher moves its split sizes to the host with
    # ``maybe_move_tensor_to_cpu(as_numpy=True)``, which converts CUDA tensors only; on CPU
    # they would stay tensors, and gloo's all_to_all_single refuses tensor split sizes.
    from megatron.core.transformer.moe import token_dispatcher

    def move_to_host(tensor, as_numpy=False, record_stream=False):
        if as_numpy and torch.is_tensor(tensor):
            return tensor.numpy()
        return tensor

    token_dispatcher.maybe_move_tensor_to_cpu = move_to_host
    _patch_uneven_collectives()
    _patch_recompute()


def _patch_recompute() -> None:
    """Activation recomputation (``model.recompute``): megatron's checkpoint functions
    rerun the forward inside their autograd ``backward``, where the TorchFunctionMode
    below is not active (autograd runs backward functions outside the caller's torch
    function modes), so the recomputed forward's literal ``device="cuda"`` (e.g. the
    causal mask of ``get_default_causal_mask``) would reach CUDA. Their backward is run
    under the mode. Their RNG handling needs nothing more: ``_get_all_rng_states`` reads
    the CPU generator, the emulated CUDA state (the same generator, through the patched
    ``_get_cuda_rng_state``) and the model-parallel tracker's states, and restores them
    for the recomputation, so dropout masks repeat exactly."""
    from megatron.core.tensor_parallel import random as mrandom

    for cls in (mrandom.CheckpointFunction, mrandom.CheckpointWithoutOutputFunction):
        backward = cls.backward

        def under_mode(ctx, *args, _backward=backward):
            with _CudaToCpuMode():
                return _backward(ctx, *args)

        cls.backward = staticmethod(under_mode)


def _patch_uneven_collectives() -> None:
    """MoE under TP (ETP > 1): the all-to-all dispatcher all-gathers and reduce-scatters
    each TP rank's routed tokens over the TP group, in uneven pieces (split sizes). NCCL
    takes uneven lists; gloo's all_gather/reduce_scatter refuse them. Emulated on CPU:
    pad to the largest piece and all-gather; all-reduce and keep this rank's piece."""
    from megatron.core.tensor_parallel import mappings

    gather, reduce_scatter = mappings._gather_along_first_dim, mappings._reduce_scatter_along_first_dim

    def gather_along_first_dim(input_, group, output_split_sizes=None, use_global_buffer=False):
        if output_split_sizes is None or group.size() == 1:
            return gather(input_, group, output_split_sizes, use_global_buffer)
        sizes = [int(n) for n in output_split_sizes]
        padded = input_.new_zeros((max(sizes), *input_.shape[1:]))
        padded[: input_.size(0)] = input_
        pieces = [torch.empty_like(padded) for _ in sizes]
        torch.distributed.all_gather(pieces, padded, group=group)
        return torch.cat([piece[:n] for piece, n in zip(pieces, sizes)])

    def reduce_scatter_along_first_dim(input_, group, input_split_sizes=None,
                                       use_global_buffer=False):
        if input_split_sizes is None or group.size() == 1:
            return reduce_scatter(input_, group, input_split_sizes, use_global_buffer)
        total = input_.contiguous().clone()
        torch.distributed.all_reduce(total, group=group)
        sizes = [int(n) for n in input_split_sizes]
        return torch.split(total, sizes)[group.rank()].clone()

    mappings._gather_along_first_dim = gather_along_first_dim
    mappings._reduce_scatter_along_first_dim = reduce_scatter_along_first_dim


def enable() -> None:
    """Activate the CPU emulation for this process (idempotent); with
    ``PHOENIX_NCCL_STRICT=1`` also the strict device mode's tensor labels
    (phoenix.runtime.device_tracking)."""
    global _ENABLED, _TRACK
    if _ENABLED:
        return
    if torch.cuda.is_available():
        raise RuntimeError(
            "phoenix: the cpu device backend was requested on a machine with CUDA; "
            "set runtime.device=cuda (the cpu emulation never runs on a GPU machine)"
        )
    # On CPU, TE and apex never exist; megatron warns about it once per module. Say it
    # once here instead (the CUDA path keeps megatron's warnings).
    import warnings

    warnings.filterwarnings("ignore", message=".*(Transformer Engine|Apex|apex).*")
    _patch_torch_cuda()
    _patch_megatron()
    # torch.compile (megatron's jit_fuser: the fusions of model.fusions), on a hit of
    # inductor's FX graph cache, asks every process group for its CUDA backend (torch 2.13
    # codecache.add_ephemeral_timeout_increase_for_distributed), which the strict groups
    # do not have: compile afresh instead (a few seconds for megatron's small kernels).
    import torch._inductor.config as inductor_config

    inductor_config.fx_graph_cache = False
    _TRACK = device_tracking.strict_enabled()
    _CudaToCpuMode().__enter__()  # stays active for the life of the process
    _ENABLED = True
    log.info("phoenix: cpu device backend (gloo; megatron-core CUDA calls emulated; no TE/apex: "
             "local layer spec and torch optimizers)")


def is_enabled() -> bool:
    return _ENABLED
