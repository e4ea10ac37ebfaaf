"""MoE monitoring: ``moe/*`` routing tags and per-expert norms, at EP=2 as in one process.

The slow tests run configs/quickstart_moe.yaml (the quickstart with the tiny_moe preset,
EP=2 on 2 gloo processes) on the tiny test data from the initial weights of a
single-process (EP=1) reference run, and read the event files back with TensorBoard's
own reader: the routing tags and the per-expert norms must equal the reference's, the
norm parts must still add up to megatron's global grad norm, and training with the
monitors must be bit-identical to training without them.
"""

import math

import pytest
import torch

from phoenix.monitor.moe import router_entropy_sum, routing_tags
from phoenix.monitor.norms import expert_key, layer_part
from phoenix.testing.norm_runs import STEPS, train_moe

LAYERS, EXPERTS = ("layer_00", "layer_01", "layer_02", "layer_03"), 4


# -- fast ------------------------------------------------------------------------------
@pytest.mark.parametrize("name, experts, part", [
    ("mlp.router.weight", None, "mlp/router"),
    ("mlp.router.expert_bias", None, "mlp/router"),
    ("mlp.experts.local_experts.1.linear_fc1.weight", None, "mlp/expert_01/fc1"),
    ("mlp.experts.local_experts.1.linear_fc2.weight", [2, 3], "mlp/expert_03/fc2"),
    ("mlp.experts.linear_fc1.weight0", [4, 5], "mlp/expert_04/fc1"),  # TEGroupedMLP
    ("mlp.experts.linear_fc2.bias1", [4, 5], "mlp/expert_05/fc2"),
    ("mlp.experts.weight1", None, "mlp/experts/fc1"),  # legacy GroupedMLP: all local experts
    ("mlp.shared_experts.linear_fc1.weight", None, "mlp/shared/fc1"),
    ("mlp.shared_experts.gate_weight", None, "mlp/shared/gate"),
    ("mlp.linear_fc1.weight", None, "mlp/fc1"),  # dense MLP unchanged
])
def test_layer_part_of_moe_parameters(name, experts, part):
    assert layer_part(name, experts, num_experts=8) == part


def test_expert_key_is_zero_padded():
    assert expert_key(3, 4) == "expert_03"
    assert expert_key(7, 128) == "expert_007"


def test_routing_tags_by_hand():
    tags = routing_tags([3.0, 1.0, 0.0, 4.0], tokens=5, topk=2, entropy_sum=2.5,
                        prefix="moe/layer_01", per_expert=True, dropped=True)
    assert tags == {"moe/layer_01/imbalance": 2.0, "moe/layer_01/min_load": 0.0,
                    "moe/layer_01/expert_00/tokens": 3 / 8, "moe/layer_01/expert_01/tokens": 1 / 8,
                    "moe/layer_01/expert_02/tokens": 0.0, "moe/layer_01/expert_03/tokens": 0.5,
                    "moe/layer_01/router_entropy": 0.5,
                    "moe/layer_01/dropped_tokens": 1 - 8 / 10}
    compact = routing_tags([2.0, 2.0], tokens=2, topk=2, entropy_sum=0.0, prefix="p",
                           per_expert=False, dropped=False)
    assert compact == {"p/imbalance": 1.0, "p/min_load": 1.0, "p/router_entropy": 0.0}


def test_router_entropy():
    uniform = torch.zeros(5, 8)
    assert math.isclose(float(router_entropy_sum(uniform, "softmax")), 5 * math.log(8), rel_tol=1e-12)
    assert math.isclose(float(router_entropy_sum(uniform, "sigmoid")), 5 * math.log(8), rel_tol=1e-12)
    peaked = torch.tensor([[50.0, 0.0, 0.0, 0.0]])
    assert float(router_entropy_sum(peaked, "softmax")) < 1e-15
    p = torch.softmax(torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64), 0)
    want = float(-(p * p.log()).sum())
    assert math.isclose(float(router_entropy_sum(torch.tensor([[1.0, 2.0, 3.0]]), "softmax")), want,
                        rel_tol=1e-12)


def test_moe_interval_defaults_to_log_interval():
    from phoenix.config.monitoring import LoggingConfig

    assert LoggingConfig(log_interval=5).moe_interval == 5
    assert LoggingConfig(log_interval=5, moe_interval=0).moe_interval == 0


# -- slow: the MoE quickstart at EP=2 against one process (tests/monitor/conftest.py) -----
def _close(a, b, rel):
    return math.isclose(a, b, rel_tol=rel, abs_tol=1e-12)


@pytest.mark.slow
def test_quickstart_moe_writes_the_moe_tags(moe_runs):
    (scalars, histograms), results = moe_runs["ep2"]
    for layer in LAYERS:
        p = f"moe/{layer}"
        for tag in ("aux_loss", "z_loss", "imbalance", "min_load", "router_entropy"):
            assert sorted(scalars[f"{p}/{tag}"]) == list(range(1, STEPS + 1)), f"{p}/{tag}"
        assert f"{p}/dropped_tokens" not in scalars  # dropless
        assert f"{p}/tokens_per_expert" in histograms
        for step in range(1, STEPS + 1):
            shares = [scalars[f"{p}/expert_{e:02d}/tokens"][step] for e in range(EXPERTS)]
            assert _close(sum(shares), 1.0, 1e-6)
            assert _close(scalars[f"{p}/imbalance"][step], max(shares) * EXPERTS, 1e-6)
            assert 0 < scalars[f"{p}/router_entropy"][step] <= math.log(EXPERTS) + 1e-9
            assert 0.9 < scalars[f"{p}/aux_loss"][step] < 2.0  # ~1 near balance, unscaled
            assert scalars[f"{p}/z_loss"][step] > 0
    assert [r["is_logging_rank"] for r in results] == [True, False]  # DP 0 writes
    assert _close(results[0]["moe_last"]["moe/imbalance"],
                  max(scalars[f"moe/{layer}/imbalance"][STEPS] for layer in LAYERS), 1e-6)


@pytest.mark.slow
def test_moe_tags_match_single_process(moe_runs):
    (ref, _), _ = moe_runs["ref"]
    (got, _), _ = moe_runs["ep2"]
    moe_tags = sorted(t for t in ref if t.startswith("moe/"))
    assert moe_tags == sorted(t for t in got if t.startswith("moe/"))
    bad = [f"{t} step {s}: {got[t][s]} != {v}" for t in moe_tags for s, v in ref[t].items()
           if not _close(got[t][s], v, 1e-4)]
    assert not bad, "\n".join(bad[:20])


def _parts(scalars):
    """Grad-norm leaves: every tag but whole layers and the global value."""
    return [t for t in scalars if t.startswith("grad_norm/") and t != "grad_norm/global"
            and not (t.startswith("grad_norm/layer_") and t.count("/") == 1)]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["ep2", "ep2_no_distopt"])
def test_per_expert_norms_match_single_process_and_sum_to_the_global_norm(moe_runs, name):
    (ref, _), _ = moe_runs["ref"]
    (got, _), _ = moe_runs[name]
    expert_tags = [f"{fam}/{layer}/mlp/expert_{e:02d}/{fc}" for fam in ("grad_norm", "param_norm")
                   for layer in LAYERS for e in range(EXPERTS) for fc in ("fc1", "fc2")]
    assert set(expert_tags) <= set(ref) and set(expert_tags) <= set(got)
    assert "grad_norm/layer_00/mlp/router" in got
    assert not [t for t in got if t.startswith("grad_norm/") and t.endswith("/other")]
    norm_tags = sorted(t for t in ref if t.startswith(("grad_norm/", "param_norm/", "update_norm/")))
    assert norm_tags == sorted(t for t in got if t.startswith(("grad_norm/", "param_norm/",
                                                              "update_norm/")))
    bad = [f"{t} step {s}: {got[t][s]} != {v}" for t in norm_tags for s, v in ref[t].items()
           if not _close(got[t][s], v, 1e-4)]
    assert not bad, "\n".join(bad[:20])
    for scalars in (ref, got):  # squares of the parts = megatron's global grad norm squared
        parts = _parts(scalars)
        for step, norm in scalars["1_train/grad_norm"].items():
            total = sum(scalars[t][step] ** 2 for t in parts)
            assert _close(total, norm ** 2, 1e-5), (step, math.sqrt(total), norm)


@pytest.mark.slow
def test_moe_monitoring_does_not_change_training(moe_runs):
    """MoE, norm and optimizer-state norm monitors every step vs none: bit-identical
    losses and grad norms."""
    (with_scalars, _), with_monitors = moe_runs["ep2"]
    (without_scalars, _), without = moe_runs["ep2_off"]
    assert any(t.startswith("moe/") for t in with_scalars)
    assert any(t.startswith("adam_m_norm/") for t in with_scalars)
    assert not any(t.startswith(("moe/", "grad_norm/", "adam_")) for t in without_scalars)
    for a, b in zip(with_monitors, without):
        assert [(s["loss"], s["grad_norm"]) for s in a["steps"]] == \
               [(s["loss"], s["grad_norm"]) for s in b["steps"]]


@pytest.mark.slow
def test_dropped_tokens_with_capacity(tiny_data, tmp_path):
    from phoenix.testing.tiny import tiny_config_dict

    cfg = tiny_config_dict(tiny_data, tmp_path, train={"steps": 3},
                           model={"preset": "tiny_moe", "num_layers": 1,
                                  "moe": {"capacity_factor": 1.0}},
                           logging={"tensorboard": True, "log_interval": 1})
    (result,) = train_moe(cfg, 1, norm_interval=0)
    tags = result["moe_last"]
    dropped = tags["moe/layer_00/dropped_tokens"]
    assert 0 < dropped < 0.5, tags
    # Capacity 1.0 caps every expert at the mean demand per micro-batch.
    assert 1.0 <= tags["moe/layer_00/imbalance"] <= 1.0 / (1 - dropped) + 1e-9, tags
