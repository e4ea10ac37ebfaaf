"""model.recompute (megatron recompute_granularity / _method / _num_layers / _modules):
the same losses and grad norms as without it (<= 1e-6 relative) on the CPU backend, at
TP=2 and PP=2, dense and MoE (EP=2), full and selective; the MoE aux loss counted once
(Megatron-LM #1330: under full recompute the router's forward runs twice); bad
combinations refused by key."""

import pytest

from phoenix.config import ConfigError
from phoenix.testing.distributed import run_distributed
from phoenix.testing.tiny import tiny_config, tiny_config_dict
from phoenix.testing.workers import train_jobs_with_moe_losses

RECOMPUTE = {
    "none": [],
    "full": ["model.recompute.granularity=full", "model.recompute.method=uniform",
             "model.recompute.num_layers=1"],
    "selective": ["model.recompute.granularity=selective"],
}
MOE = {"preset": "tiny_moe", "num_layers": 2, "moe": {"z_loss_coeff": 1e-3}}
LAYOUTS = {
    "dense_tp2": ({}, ["parallel.tensor=2"]),
    "dense_pp2": ({}, ["parallel.pipeline=2"]),
    "moe_tp2_ep2": (MOE, ["parallel.tensor=2", "parallel.expert=2", "parallel.expert_tensor=1",
                          "parallel.sequence_parallel=true"]),
    "moe_pp2_ep1": (MOE, ["parallel.pipeline=2"]),
}


def _rel(a, b):
    return abs(a - b) / max(abs(b), 1e-30)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(LAYOUTS))
def test_recompute_trains_like_no_recompute(name, tiny_data, tmp_path):
    model, layout = LAYOUTS[name]
    cfg = tiny_config_dict(tiny_data, tmp_path, train={"steps": 3},
                           model={"preset": "tiny", **model},
                           logging={"log_interval": 1, "moe_interval": 1, "tensorboard": False})
    jobs = [layout + RECOMPUTE[k] for k in RECOMPUTE]
    results = run_distributed(train_jobs_with_moe_losses, 2, cfg, jobs)
    if model:  # the MoE monitor logs on the logging rank
        assert any(r[0]["steps"][0]["aux_loss"] for r in results)
    for rank in results:
        assert rank[0]["checkpointed"] == 0 and all(r["checkpointed"] > 0 for r in rank[1:])
        ref = rank[0]["steps"]
        assert len(ref) == 3 and ref[0]["loss"] != ref[-1]["loss"]
        for kind, run in zip(list(RECOMPUTE)[1:], rank[1:]):
            for got, want in zip(run["steps"], ref):
                for key in ("loss", "grad_norm"):
                    assert _rel(got[key], want[key]) <= 1e-6, (name, kind, key, got, want)
                if want["aux_loss"] is not None:  # counted once, as without recompute
                    for key in ("aux_loss", "z_loss"):
                        assert _rel(got[key], want[key]) <= 1e-6, (name, kind, key, got, want)


@pytest.mark.parametrize("overrides,message", [
    (["model.recompute.method=block"], "model.recompute.method: only with granularity full"),
    (["model.recompute.granularity=selective", "model.recompute.num_layers=1"],
     "model.recompute.num_layers: only with granularity full"),
    (["model.recompute.granularity=full", "model.recompute.modules=[mlp]"],
     "model.recompute.modules: only with granularity selective"),
    (["model.recompute.granularity=selective", "model.recompute.modules=[attn]"],
     "model.recompute.modules: \\['attn'\\] not among"),
    (["model.recompute.granularity=full", "model.recompute.num_layers=3",
      "parallel.pipeline=2"], "model.recompute.num_layers: 3 exceeds the 2 layers per"),
    (["model.recompute.granularity=selective", "model.recompute.modules=[moe]"],
     "model.recompute.modules: moe needs model.moe"),
])
def test_bad_recompute_refused_by_key(overrides, message, tiny_data, tmp_path):
    with pytest.raises(ConfigError, match=message):
        cfg = tiny_config(tiny_data, tmp_path, overrides)
        cfg.validate_layout(2)


def test_recompute_sets_megatron_fields(tiny_data, tmp_path):
    cfg = tiny_config(tiny_data, tmp_path, ["model.recompute.granularity=full"])
    assert cfg.model.recompute.megatron_kwargs() == dict(
        recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
    cfg = tiny_config(tiny_data, tmp_path, ["model.recompute.granularity=selective"])
    assert cfg.model.recompute.megatron_kwargs() == dict(
        recompute_granularity="selective", recompute_modules=["core_attn"])
    assert tiny_config(tiny_data, tmp_path).model.recompute.megatron_kwargs() == {}


def test_layernorm_recompute_needs_te(tiny_data, tmp_path):
    """megatron-core 0.16.1's CheckpointWithoutOutput (layernorm, moe_act) calls TE's fp8
    state even without fp8: refused on CPU by key, as the dry run does."""
    from phoenix.runtime.capabilities import check_capabilities

    cfg = tiny_config(tiny_data, tmp_path, ["model.recompute.granularity=selective",
                                            "model.recompute.modules=[core_attn,layernorm]"])
    with pytest.raises(ConfigError, match="model.recompute.modules: layernorm needs Transformer"):
        check_capabilities(cfg)
    check_capabilities(tiny_config(tiny_data, tmp_path, [
        "model.recompute.granularity=selective", "model.recompute.modules=[core_attn,mlp]"]))
