"""A step's host synchronisations do not grow with the model (issue: the lean step).

Counted under the strict device mode on 2 real processes (DP=2) with the run's default
callbacks (console, TensorBoard, norms, per-dataset loss, throughput) over one whole step
cycle that writes nothing, for a 2-layer and an 8-layer model. Before the lean step the
count was 6L+10-ish (a per-parameter finiteness check, a per-dataset host copy each step).
"""

import pytest

from phoenix.testing.distributed import run_distributed
from phoenix.testing.host_syncs import count_step_syncs
from phoenix.testing.tiny import tiny_config_dict

pytestmark = pytest.mark.slow


def _count(tiny_data, tmp_path, layers: int) -> dict:
    cfg = tiny_config_dict(tiny_data, tmp_path / f"l{layers}", train={"steps": 5},
                           logging={"tensorboard": True, "log_interval": 5},
                           checkpoint={"save_at_end": False})
    results = run_distributed(count_step_syncs, 2, cfg, [f"model.num_layers={layers}"])
    return results[-1]


def test_host_syncs_of_a_step_do_not_grow_with_layers(tiny_data, tmp_path):
    small, large = _count(tiny_data, tmp_path, 2), _count(tiny_data, tmp_path, 8)
    for result in (small, large):  # the monitors a user runs were there
        assert {"NormMonitor", "DatasetLossMonitor", "ThroughputMonitor",
                "TensorBoardLogger"} <= set(result["callbacks"])
        assert result["count"] is not None
    assert small["count"] == large["count"], (small["sites"], large["sites"])
    # The loss report, the skip and stop agreements, megatron's token count and grad norm.
    assert large["count"] <= 6, large["sites"]
