"""Transformer Engine's userbuffers for ``parallel.tp_comm_overlap``.

megatron-core sets ``tp_comm_overlap`` on TE's linears, but the buffers their overlapped
all-gather / reduce-scatter GEMMs use are created by the training loop (Megatron-LM's
``training/initialize.py::_initialize_tp_communicators``): one ``initialize_ub`` per
process, for activations of ``[seq_length x micro_batch_size / context, hidden]``. This is
that call, after the process groups exist and before the first forward.
phoenix.runtime.capabilities has already refused what the buffers cannot serve (no TE,
no sequence parallelism, more than one sequence length, eval of another shape).
**Not yet run** by phoenix on a GPU.
"""

from __future__ import annotations

import logging

from phoenix.config import RunConfig

log = logging.getLogger(__name__)


def initialize_userbuffers(cfg: RunConfig) -> None:
    """``transformer_engine.pytorch.module.base.initialize_ub`` for this run's shape."""
    from megatron.core.utils import is_te_min_version
    from transformer_engine.pytorch import module as te_module

    (seq_length,) = {s.seq_length for s in cfg.resolved.stages.stages}
    p = cfg.parallel
    shape = [seq_length * cfg.train.micro_batch_size // p.context, cfg.model.hidden_size]
    fp8 = cfg.train.fp8 is not None
    kwargs = dict(shape=shape, tp_size=p.tensor, ub_cfgs={}, bootstrap_backend="nccl")
    if is_te_min_version("2.7.0"):
        mode = te_module.base.UserBufferQuantizationMode
        kwargs["quantization_modes"] = [mode.FP8 if fp8 else mode.NONE]
    elif is_te_min_version("1.9.0"):
        kwargs["use_fp8"] = fp8
    else:
        raise RuntimeError("parallel.tp_comm_overlap: needs Transformer Engine >= 1.9 (older "
                           "versions bootstrap the userbuffers over MPI)")
    te_module.base.initialize_ub(**kwargs)
    log.info("tp_comm_overlap: Transformer Engine userbuffers for activations %s", shape)
