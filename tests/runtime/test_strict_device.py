"""The strict device mode (PHOENIX_NCCL_STRICT=1): host tensors on non-gloo groups fail as
under NCCL, with the call site; gloo groups, device tensors and object collectives pass.

Every test of the suite runs under the mode (tests/conftest.py); these tests check that
the mode itself bites, with real processes.
"""

from __future__ import annotations

import types

import pytest
import torch

from phoenix.testing.distributed import run_distributed

pytestmark = pytest.mark.slow


def _layout(rank: int):
    import torch.distributed as dist

    from phoenix.runtime.device_tracking import DEVICE

    groups = [dist.new_group([0]), dist.new_group([1])]  # every rank creates every group
    return types.SimpleNamespace(rank=rank, is_last_stage=rank == 1, world_size=2, pp_size=2,
                                 dp_cp_group=groups[rank], device=DEVICE)


def _old_global_loss(self, losses):
    """The trainer's loss report as it was before the CUDA-path fix (``_global_loss``): a
    host tensor broadcast from the last rank."""
    import torch.distributed as dist

    from phoenix.train.step import reduce_loss

    report = torch.zeros(2, dtype=torch.float64)
    if self.layout.is_last_stage:
        total = reduce_loss(losses, self.layout.dp_cp_group)
        report = torch.tensor([float(total[0]) / float(total[1]), float(total[1])],
                              dtype=torch.float64)
    dist.broadcast(report, src=self.layout.world_size - 1)
    return float(report[0]), int(report[1])


def _global_losses():
    """On 2 ranks (rank 1 the last pipeline stage): the trainer's step report, then the
    old loss report; returns (new result, old error)."""
    import torch.distributed as dist

    from phoenix.runtime.device_tracking import DEVICE
    from phoenix.train.trainer import Trainer

    rank = dist.get_rank()
    assert dist.get_backend() == "phoenix_strict"
    trainer = types.SimpleNamespace(layout=_layout(rank), model=[])
    losses = ([{"lm loss": torch.tensor([12.0, 4.0], device=DEVICE)}] if rank == 1 else [])
    new = Trainer._step_report(trainer, losses)
    try:
        _old_global_loss(trainer, losses)
        old = None
    except RuntimeError as e:
        old = str(e)
    dist.barrier()
    return new, old


def test_old_global_loss_fails_and_the_trainers_passes():
    results = run_distributed(_global_losses, 2)
    for new, old in results:
        assert new == (3.0, 4, True)
        assert old is not None and "No backend type associated with device type cpu" in old
        assert "test_strict_device.py" in old and "_old_global_loss" in old  # the call site


def _kinds_of_collectives():
    import torch.distributed as dist

    from phoenix.runtime.device_tracking import DEVICE, is_host

    rank = dist.get_rank()
    outcome = {}

    def attempt(name, fn):
        try:
            fn()
            outcome[name] = "ok"
        except RuntimeError as e:
            outcome[name] = "refused" if "device type cpu" in str(e) else f"error: {e}"

    host, device = torch.ones(3), torch.ones(3, device=DEVICE)
    gloo = dist.new_group([0, 1], backend="gloo")  # as megatron's *_gloo groups
    default = dist.new_group([0, 1])  # inherits the world's backend, as megatron's TP/PP/DP
    attempt("host_world", lambda: dist.all_reduce(host))
    attempt("host_default_new_group", lambda: dist.all_reduce(torch.ones(2), group=default))
    attempt("host_gloo_group", lambda: dist.all_reduce(torch.ones(2), group=gloo))
    attempt("device_world", lambda: dist.all_reduce(device))
    attempt("derived_from_device", lambda: dist.all_reduce(device.sum().reshape(1) * 2))
    attempt("like_device", lambda: dist.all_reduce(torch.zeros(2, device=device.device)))
    attempt("moved_to_device", lambda: dist.all_reduce(torch.zeros(2).cuda()))
    attempt("moved_to_host", lambda: dist.all_reduce(device.cpu()))
    attempt("host_gather", lambda: dist.all_gather([torch.empty(2, device=DEVICE)] * 2, torch.ones(2)))
    peer = 1 - rank
    attempt("host_p2p", lambda: [w.wait() for w in dist.batch_isend_irecv(
        [dist.P2POp(dist.isend, torch.ones(2), peer), dist.P2POp(dist.irecv, torch.empty(2), peer)])])
    attempt("device_p2p", lambda: [w.wait() for w in dist.batch_isend_irecv(
        [dist.P2POp(dist.isend, torch.ones(2, device=DEVICE), peer),
         dist.P2POp(dist.irecv, torch.empty(2, device=DEVICE), peer)])])
    objects = [None, None]
    attempt("object_collective", lambda: dist.all_gather_object(objects, {"rank": rank}))
    outcome["objects"] = objects
    outcome["labels"] = (is_host(host), is_host(device), is_host(device.cpu()))
    dist.barrier()
    return outcome


def test_host_tensors_are_refused_where_nccl_would_refuse_them():
    for outcome in run_distributed(_kinds_of_collectives, 2):
        assert outcome["labels"] == (True, False, True)
        refused = {k for k, v in outcome.items() if v == "refused"}
        assert refused == {"host_world", "host_default_new_group", "host_gather", "host_p2p",
                           "moved_to_host"}, outcome
        assert all(outcome[k] == "ok" for k in ("host_gloo_group", "device_world",
                                                "derived_from_device", "like_device",
                                                "moved_to_device", "device_p2p",
                                                "object_collective")), outcome
        assert outcome["objects"] == [{"rank": 0}, {"rank": 1}]
