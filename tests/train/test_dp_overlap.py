"""Data-parallel communication overlap (parallel.overlap_grad_reduce, overlap_param_gather,
bucket_size): the same losses, grad norms and saved weights as without it, at DP=2 and
DP=2 x PP=2 with the distributed optimizer, under the strict device mode.

Small buckets make the overlap real (several buckets reduced during the backward and
gathered during the next forward). A checkpoint saved right after an optimizer step must
hold the updated weights, which under overlap_param_gather reach the other ranks' shards
only in the next forward: the saved tensors are compared with the run without overlap.
"""

import pytest
import torch

from phoenix.config import ConfigError
from phoenix.testing.checkpoints import read_checkpoint_tensors
from phoenix.testing.distributed import run_distributed
from phoenix.testing.tiny import tiny_config, tiny_config_dict
from phoenix.testing.workers import train_and_record

pytestmark = pytest.mark.slow

OVERLAP = ["parallel.overlap_grad_reduce=true", "parallel.overlap_param_gather=true",
           "parallel.bucket_size=4000"]


@pytest.mark.parametrize("world,layout", [(2, []), (4, ["parallel.pipeline=2"])],
                         ids=["dp2", "dp2_pp2"])
def test_overlap_trains_and_saves_like_no_overlap(tiny_data, tmp_path, world, layout):
    runs = {}
    for name, extra in (("plain", []), ("overlap", OVERLAP)):
        cfg = tiny_config_dict(tiny_data, tmp_path / name, train={"steps": 4},
                               checkpoint={"save_interval": 3, "save_at_end": True})
        results = run_distributed(train_and_record, world, cfg, layout + extra)
        runs[name] = results[-1]["steps"]
        losses = {tuple(s["loss"] for s in r["steps"]) for r in results}
        assert len(losses) == 1  # every rank knows the global loss
    for plain, overlap in zip(runs["plain"], runs["overlap"]):
        assert overlap["loss"] == pytest.approx(plain["loss"], rel=1e-6, abs=0)
        assert overlap["grad_norm"] == pytest.approx(plain["grad_norm"], rel=1e-5, abs=0)
    for step in ("step_000003", "step_000004"):
        a = read_checkpoint_tensors(tmp_path / "plain" / "checkpoints" / step, model_only=True)
        b = read_checkpoint_tensors(tmp_path / "overlap" / "checkpoints" / step, model_only=True)
        assert a.keys() == b.keys() and a
        for key in a:
            torch.testing.assert_close(b[key], a[key], rtol=1e-5, atol=1e-7, msg=key)


def test_overlap_param_gather_needs_the_distributed_optimizer(tiny_data, tmp_path):
    with pytest.raises(ConfigError, match="parallel.overlap_param_gather: needs "
                                          "parallel.use_distributed_optimizer"):
        tiny_config(tiny_data, tmp_path, ["parallel.overlap_param_gather=true",
                                          "parallel.use_distributed_optimizer=false"])


def test_overlap_defaults_follow_device_and_data_parallel_size(tiny_data, tmp_path):
    cfg = tiny_config(tiny_data, tmp_path)
    assert cfg.parallel.overlap("cuda", 8) == (True, True)
    assert cfg.parallel.overlap("cuda", 1) == (False, False)
    assert cfg.parallel.overlap("cpu", 8) == (False, False)
