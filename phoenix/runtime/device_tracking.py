"""Where a tensor would live on a GPU, tracked on the CPU (the strict device mode).

Under the cpu backend every tensor is a host tensor, so gloo accepts what NCCL refuses:
a host tensor on an NCCL collective (``RuntimeError: No backend type associated with
device type cpu``). To find those here, the cpu emulation's torch-function mode
(:mod:`phoenix.runtime.cpu_backend`) labels tensors with the device they would have on a
GPU, when ``PHOENIX_NCCL_STRICT=1`` (:func:`strict_enabled`):

* ``"cuda"``: made with a CUDA device spec (``device="cuda"``, an ordinal,
  ``torch.cuda.current_device()``, the run's ``layout.device``, or ``t.device`` of such a
  tensor), moved with ``.cuda()`` / ``.to("cuda")``, or computed from such a tensor;
* ``"host"``: made by a factory without a device or with a host one
  (``torch.zeros(2)``, ``torch.tensor([x])``, ``device="cpu"``), moved with ``.cpu()``
  / ``.to("cpu")``, marked by :func:`mark_host` (the loader's batches), or computed only
  from host tensors;
* parameters count as ``"cuda"`` (the model is moved to the run's device before any
  step), so do their ``.grad`` and ``.data``;
* unlabelled: made where the mode does not run (autograd's backward, other threads,
  ``torch.from_numpy``, ``torch.get_rng_state``). Neither the collective check nor the
  sync counter acts on them (no false alarm on megatron's own tensors).

The emulated CUDA device is one ``torch.device("cpu")`` object, :data:`DEVICE`: its type
stays ``cpu`` (so every ``device.type`` test of megatron and phoenix behaves as before on
the CPU), and its identity says "CUDA". ``t.device`` of a tensor not labelled host returns
it, so ``torch.zeros(n, device=t.device)`` is labelled like ``t``.

The same labels count host synchronisations: ``.item()``, ``.tolist()``, ``bool()``,
``float()``, ``int()``, ``.numpy()`` and ``.cpu()`` of a tensor labelled ``"cuda"``
(:func:`count_host_syncs`).
"""

from __future__ import annotations

import contextlib
import os
import traceback

import torch

DEVICE = torch.device("cpu")
"""The emulated CUDA device (see the module docstring): ``layout.device`` and
``torch.cuda.current_device()`` under the cpu backend."""

STRICT_ENV = "PHOENIX_NCCL_STRICT"
_ATTR = "_phoenix_device"
_HOST, _CUDA = "host", "cuda"

_SYNC_FUNCS = {torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.__bool__,
               torch.Tensor.__float__, torch.Tensor.__int__, torch.Tensor.__index__,
               torch.Tensor.numpy}
_TO_HOST = {torch.Tensor.cpu}
_TO_CUDA = {torch.Tensor.cuda}
_SPEC_FACTORIES = {torch.tensor, torch.as_tensor}
_DEVICE_GET = torch.Tensor.device.__get__
_DATA_SET = torch.Tensor.data.__set__


def strict_enabled() -> bool:
    """Whether ``PHOENIX_NCCL_STRICT=1`` asks for the strict device mode."""
    return os.environ.get(STRICT_ENV, "0") not in ("", "0", "false", "False")


class _Counter:
    def __init__(self):
        self.count = 0
        self.sites: list[str] = []


_counters: list[_Counter] = []


@contextlib.contextmanager
def count_host_syncs():
    """Count, inside the block, the calls that copy a (would-be) GPU tensor's value to
    the host: yields an object whose ``count`` and ``sites`` (what and where) grow.
    Needs the strict device mode (the labels); raises RuntimeError without it."""
    if not strict_enabled():
        raise RuntimeError(f"count_host_syncs needs {STRICT_ENV}=1 (the strict device mode)")
    counter = _Counter()
    _counters.append(counter)
    try:
        yield counter
    finally:
        _counters.remove(counter)


def label(t) -> str | None:
    """``"host"``, ``"cuda"`` or None (unlabelled) for tensor ``t``."""
    if isinstance(t, torch.nn.Parameter):
        return _CUDA
    return getattr(t, _ATTR, None)


def is_host(t) -> bool:
    return getattr(t, _ATTR, None) == _HOST


def mark_host(obj):
    """Label the tensors of ``obj`` (a tensor, or a dict / list / tuple of them, one level)
    as host tensors, as a loader's batches are on a GPU machine; returns ``obj``. A no-op
    outside the strict device mode."""
    if not strict_enabled():
        return obj
    values = obj.values() if isinstance(obj, dict) else obj if isinstance(obj, (list, tuple)) else [obj]
    for v in values:
        if torch.is_tensor(v) and not isinstance(v, torch.nn.Parameter):
            setattr(v, _ATTR, _HOST)
        elif isinstance(v, (dict, list, tuple)):
            mark_host(v)
    return obj


def is_cuda_spec(device) -> bool:
    """Whether a device argument means a CUDA device (before the emulation maps it)."""
    if device is DEVICE or isinstance(device, int):
        return True
    if isinstance(device, str):
        return device.startswith("cuda")
    return isinstance(device, torch.device) and device.type == "cuda"


def _tensor_labels(args, kwargs):
    labels = []
    for a in (*args, *kwargs.values()):
        if torch.is_tensor(a):
            labels.append(label(a))
        elif isinstance(a, (list, tuple)):
            labels.extend(label(x) for x in a if torch.is_tensor(x))
    return labels


def _set(out, value):
    if torch.is_tensor(out):
        if not isinstance(out, torch.nn.Parameter):
            setattr(out, _ATTR, value)
    elif isinstance(out, (list, tuple)):
        for x in out:
            if torch.is_tensor(x) and not isinstance(x, torch.nn.Parameter):
                setattr(x, _ATTR, value)


_EMULATION = tuple(f"phoenix/runtime/{m}.py" for m in ("strict_group", "cpu_backend", "device_tracking"))


def call_site() -> str:
    """``file:line (function)`` of the innermost frame outside torch and the cpu
    emulation: the phoenix or megatron line that made the call."""
    for frame in reversed(traceback.extract_stack()[:-1]):
        path = frame.filename.replace("\\", "/")
        if "/torch/" in path or path.endswith(_EMULATION):
            continue
        return f"{frame.filename}:{frame.lineno} ({frame.name})"
    return "<unknown>"


def _count(func, tensor) -> None:
    if _counters and label(tensor) == _CUDA:
        site = f"{getattr(func, '__name__', func)} at {call_site()}"
        for c in _counters:
            c.count += 1
            c.sites.append(site)


def track(func, args, kwargs, device, to_device, run):
    """Run ``run()`` (the torch call, devices already mapped to the CPU) and label its
    result. ``device``: the call's ``device=`` argument as given (None if absent);
    ``to_device``: the target of ``Tensor.to`` as given (None if not a move)."""
    if func == _DEVICE_GET:
        return torch.device("cpu") if is_host(args[0]) else DEVICE
    if func in _SYNC_FUNCS:
        _count(func, args[0])
        return run()
    if func == _DATA_SET:  # param.data = t: the parameter now lives where t does
        out = run()
        if not isinstance(args[0], torch.nn.Parameter):
            _set(args[0], label(args[1]))
        return out
    if func in _TO_HOST or (to_device is not None and not is_cuda_spec(to_device)):
        src = args[0]
        _count(func, src)
        out = run()
        if isinstance(src, torch.nn.Parameter):
            return out
        if out is src and not is_host(src):
            out = out.clone()  # a copy on a GPU machine: never relabel the original
        _set(out, _HOST)
        return out
    if func in _TO_CUDA or to_device is not None:
        src = args[0]
        out = run()
        if isinstance(src, torch.nn.Parameter):
            return out
        if out is src and is_host(src):
            out = out.clone()
        _set(out, _CUDA)
        return out
    out = run()
    if device is not None or func in _SPEC_FACTORIES:
        _set(out, _CUDA if is_cuda_spec(device) else _HOST)
        return out
    if args and out is args[0]:  # in place (or returned its input): stays where it was
        return out
    labels = _tensor_labels(args, kwargs)
    if not labels:  # a factory without a device: the host
        _set(out, _HOST)
    elif _CUDA in labels:
        _set(out, _CUDA)
    elif all(x == _HOST for x in labels):
        _set(out, _HOST)
    return out
