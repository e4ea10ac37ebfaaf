"""Per-layer norms of Adam's state (``adam_m_norm``, ``adam_v_norm``, ``adam_direction_norm``).

Oracles: torch's own AdamW update (the direction is the update it applies, before the LR);
in one process, the whole optimizer state read directly in float64
(phoenix.testing.optimizer_state.StateNormReference) and the actual weight update
(``update_norm = lr * adam_direction_norm`` where there is no weight decay, ``adam_m_norm
= (1 - β1) * clipped grad norm`` at the first step); under TP=2, PP=2, DP=2 (with and
without the distributed optimizer), TP=2 x PP=2 and EP=2, the single-process values.
The slow tests read the runs test_norms.py and test_moe_monitor.py share
(tests/monitor/conftest.py), whose monitors include this one, with TensorBoard's reader.
"""

import math

import pytest
import torch

from phoenix.config import ConfigError
from phoenix.config.monitoring import LoggingConfig
from phoenix.config.optim import OptimConfig
from phoenix.monitor.optimizer_state import FAMILIES, OptimizerStateNormMonitor, adam_direction
from phoenix.testing.norm_runs import LAYOUTS, STEPS

PREFIXES = tuple(f"{family}/" for family in FAMILIES)


def _adam_tags(scalars: dict) -> dict:
    return {t: dict(v) for t, v in scalars.items() if t.startswith(PREFIXES)}


def _close(a, b, rel):
    return math.isclose(a, b, rel_tol=rel, abs_tol=1e-12)


# -- fast ------------------------------------------------------------------------------
@pytest.mark.parametrize("group_step", [False, True])  # torch keeps t per parameter, apex per group
def test_adam_direction_is_torch_adams_update(group_step):
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(64, dtype=torch.float64))  # exact applied updates
    lr = 0.01
    opt = torch.optim.AdamW([p], lr=lr, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0)
    for _ in range(3):
        # down to grads of 1e-10, where ε dominates √v̂
        p.grad = torch.randn(64, dtype=torch.float64) * torch.logspace(-10, 0, 64, dtype=torch.float64)
        before = p.detach().clone()
        opt.step()
        applied = (before - p.detach()) / lr
        state, group = dict(opt.state[p]), dict(opt.param_groups[0])
        if group_step:
            group["step"] = state.pop("step")
        torch.testing.assert_close(adam_direction(state, group).double(), applied, rtol=1e-5,
                                   atol=1e-7)
    assert adam_direction({}, opt.param_groups[0]) is None  # no state before a first step


def test_config_key_is_an_interval_off_by_default():
    assert LoggingConfig().optimizer_state_norms == 0
    assert LoggingConfig(optimizer_state_norms=10).optimizer_state_norms == 10
    with pytest.raises(ConfigError, match="optimizer_state_norms"):
        LoggingConfig(optimizer_state_norms=-1)
    LoggingConfig(callbacks={"optimizer_state_norms": False})  # a built-in, by name
    with pytest.raises(ValueError):
        OptimizerStateNormMonitor(-1)


def test_named_callback(tiny_data, tmp_path):
    from phoenix.config import build_config
    from phoenix.testing.tiny import tiny_config_dict
    from phoenix.train.callbacks import run_callbacks

    def callbacks(*overrides):
        cfg = build_config(tiny_config_dict(tiny_data, tmp_path, logging={"tensorboard": True}),
                           overrides)
        return run_callbacks(cfg, tmp_path, "")

    assert "optimizer_state_norms" not in callbacks()
    on = callbacks("logging.optimizer_state_norms=10")["optimizer_state_norms"]
    assert isinstance(on, OptimizerStateNormMonitor) and on.interval == 10
    assert on.name == "optimizer_state_norms"
    # Heatmaps draw its layers too, also with the other norm monitor off.
    assert "heatmaps" in callbacks("logging.optimizer_state_norms=10", "logging.norm_interval=0")
    assert "optimizer_state_norms" not in callbacks(
        "logging.optimizer_state_norms=10", "logging.callbacks={optimizer_state_norms: false}")


# -- slow: the shared runs -------------------------------------------------------------
@pytest.mark.slow
def test_single_process_equals_the_optimizer_state(norms_reference):
    _, scalars, result, out = norms_reference
    got, want = _adam_tags(scalars), result["state_norms"]
    assert sorted(want) == list(range(1, STEPS + 1))
    grad_keys = {t.split("/", 1)[1] for t in scalars if t.startswith("grad_norm/")}
    assert {t.split("/", 1)[1] for t in got} == grad_keys  # the grad norms' keys, exactly
    assert {"layer_00/attention/qkv", "layer_03/mlp/fc2", "layer_02", "embedding",
            "final_norm", "output_layer", "global"} <= grad_keys
    assert set(got) == set(want[1])
    bad = [f"{t} step {s}: {got[t][s]} != {v}" for s, values in want.items()
           for t, v in values.items() if not _close(got[t][s], v, 1e-5)]
    assert not bad, "\n".join(bad[:20])
    # The heatmaps have the optimizer-state layers too.
    for family in FAMILIES:
        assert (out / "heatmaps" / f"{family}.png").stat().st_size > 0


@pytest.mark.slow
def test_direction_is_the_applied_update_and_m_starts_from_the_clipped_grad(norms_reference):
    _, scalars, result, _ = norms_reference
    s = {t: dict(v) for t, v in scalars.items()}
    beta1, clip = result["steps"][0]["groups"]["betas"][0][0], OptimConfig.clip_grad
    gn = s["1_train/grad_norm"][1]
    coeff = min(1.0, clip / (gn + 1e-6))  # megatron's clip_grad_norm_fp32
    for key in ("global", "embedding", "layer_01/mlp/fc1", "layer_02/norms"):
        assert _close(s[f"adam_m_norm/{key}"][1], (1 - beta1) * coeff * s[f"grad_norm/{key}"][1],
                      1e-5), key
    # Norm weights have no weight decay (megatron's param groups): the update is -lr * d.
    for key in ("layer_00/norms", "layer_03/norms", "final_norm"):
        for step in (2, 3):  # step 1: LR 0 (warm-up)
            lr = s["1_train/lr"][step]
            assert lr > 0 and _close(s[f"update_norm/{key}"][step],
                                     lr * s[f"adam_direction_norm/{key}"][step], 1e-4), (key, step)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(LAYOUTS))
def test_layout_matches_single_process(name, norms_reference, norms_layout_runs):
    ref = _adam_tags(norms_reference[1])
    got = _adam_tags(norms_layout_runs(name)[0])
    assert sorted(got) == sorted(ref)
    bad = [f"{t} step {s}: {got[t].get(s)} != {v}" for t in ref for s, v in ref[t].items()
           if s not in got[t] or not _close(got[t][s], v, 1e-4)]
    assert not bad, f"{name}: {len(bad)} values differ:\n" + "\n".join(bad[:20])


@pytest.mark.slow
@pytest.mark.parametrize("name", ["ep2", "ep2_no_distopt"])
def test_expert_parallel_matches_single_process(name, moe_runs):
    (ref, _), (ref_result,) = moe_runs["ref"]
    (got, _), _ = moe_runs[name]
    ref, got = _adam_tags(ref), _adam_tags(got)
    want = ref_result["state_norms"]  # the single process agrees with its own state
    assert not [t for s, v in want.items() for t, x in v.items() if not _close(ref[t][s], x, 1e-5)]
    experts = {f"{family}/layer_0{i}/mlp/expert_0{e}/{fc}" for family in FAMILIES
               for i in range(4) for e in range(4) for fc in ("fc1", "fc2")}
    assert experts <= set(ref) and sorted(got) == sorted(ref)
    assert "adam_v_norm/layer_00/mlp/router" in got
    bad = [f"{t} step {s}: {got[t].get(s)} != {v}" for t in ref for s, v in ref[t].items()
           if s not in got[t] or not _close(got[t][s], v, 1e-4)]
    assert not bad, f"{name}: {len(bad)} values differ:\n" + "\n".join(bad[:20])
