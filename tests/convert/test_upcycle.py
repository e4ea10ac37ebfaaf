"""``phoenix upcycle``: a dense checkpoint as a MoE one.

Exact setting (softmax after top-k, granularity 1): the upcycled model's logits equal the
dense model's (fp32, 1e-5) for any router, in one process and at EP=2 (2 gloo ranks), with
a mixed dense/MoE layer pattern. The approximate settings (softmax before top-k with top-2
and top-1, granularity 2 with SwiGLU) are measured and printed, bounded loosely. The weight
mapping equals megatron-core's own ``upcycle_state_dict`` where that one is correct (a
uniform MoE pattern, one model chunk).
"""

import math

import pytest
import torch

from phoenix.model.upcycling import UpcycleError, UpcycleSpec, granularity, split_fc1
from phoenix.testing.distributed import run_distributed
from phoenix.testing.tiny import tiny_config_dict
from phoenix.testing.upcycle import compare_logits, megatron_oracle, upcycle_and_compare
from phoenix.testing.workers import train_and_record

TOKENS = torch.Generator().manual_seed(0)
TOKENS = torch.randint(0, 512, (2, 32), generator=TOKENS).tolist()


def _moe(tiny_data, out, **moe):
    """The tiny model (4 layers, ffn 176, SwiGLU) with a MoE section."""
    return tiny_config_dict(tiny_data, out, model={"preset": "tiny", "vocab_size": 512,
                                                   "moe": {"num_experts": 4, **moe}})


# name -> (model.moe, exact?)
SETTINGS = {
    "exact_mixed": ({"router_topk": 2, "layer_freq": [1, 0, 1, 1]}, True),
    "pre_softmax_top2": ({"router_topk": 2, "router_pre_softmax": True}, False),
    "pre_softmax_top1": ({"router_topk": 1, "router_pre_softmax": True}, False),
    "granular_g2": ({"router_topk": 2, "ffn_hidden_size": 88}, False),
}


@pytest.fixture(scope="module")
def dense(tiny_data, tmp_path_factory):
    """A briefly trained tiny dense model (so its logits are not those of an init)."""
    out = tmp_path_factory.mktemp("dense")
    cfg = tiny_config_dict(tiny_data, out, model={"preset": "tiny", "vocab_size": 512},
                           train={"steps": 6}, checkpoint={"save_at_end": True})
    run_distributed(train_and_record, 1, cfg)
    return cfg, str(out / "checkpoints" / "step_000006")


@pytest.fixture(scope="module")
def upcycled(dense, tiny_data, tmp_path_factory):
    cfg, ckpt = dense
    root = tmp_path_factory.mktemp("upcycled")
    settings = {name: _moe(tiny_data, root / f"run_{name}", **moe)
                for name, (moe, _) in SETTINGS.items()}
    (results,) = run_distributed(upcycle_and_compare, 1, cfg, ckpt, settings, str(root), TOKENS)
    return root, settings, results


def test_scales_follow_arxiv_2410_07524_as_megatron():
    # megatron: s = g (softmax after top-k), (E/g)*g*g/k = E*g/k (softmax before top-k);
    # weights * s^(1/3) for a GLU, s^(1/2) otherwise.
    assert UpcycleSpec(num_experts=8, router_topk=2, granularity=1, gated=True).exact
    s = UpcycleSpec(num_experts=8, router_topk=4, granularity=2, gated=True)
    assert (s.activation_scale, s.weight_scale, s.exact) == (2.0, 2 ** (1 / 3), False)
    s = UpcycleSpec(num_experts=8, router_topk=2, granularity=2, gated=False, pre_softmax=True)
    assert s.activation_scale == 8 * 2 / 2 and math.isclose(s.weight_scale, 8 ** 0.5)
    assert not UpcycleSpec(num_experts=4, router_topk=2, granularity=1, gated=True,
                           dropless=False).exact
    assert UpcycleSpec(num_experts=4, router_topk=2, granularity=1, gated=True,
                       score_function="sigmoid").exact  # megatron normalises top-k>1 sigmoids
    # SwiGLU fc1 [gate; up]: segment j = [gate_j; up_j]
    fc1 = torch.arange(8.0)[:, None]  # gate rows 0-3, up rows 4-7
    assert [t.flatten().tolist() for t in split_fc1(fc1, 2, gated=True)] == [[0, 1, 4, 5], [2, 3, 6, 7]]
    with pytest.raises(UpcycleError, match="ffn_hidden_size 64 does not divide .* 176"):
        granularity(176, 64, 4)
    with pytest.raises(UpcycleError, match="num_experts 3 is not a multiple of the granularity 2"):
        granularity(176, 88, 3)


@pytest.mark.slow
def test_upcycled_logits_match_the_dense_model(upcycled):
    _, _, results = upcycled
    for name, (_, exact) in SETTINGS.items():
        r = results[name]
        print(f"upcycle {name}: max |logit error| {r['max_err']:.3g} "
              f"(dense logit std {r['logit_std']:.3g})")
        if exact:
            assert r["max_err"] < 1e-5, (name, r)
        else:  # approximate: a sanity bound only (an unscaled or mis-split MLP is far off)
            assert 0 < r["max_err"] < 2 * r["logit_std"], (name, r)


@pytest.mark.slow
def test_exact_upcycle_at_ep2(dense, upcycled):
    cfg, ckpt = dense
    root, settings, _ = upcycled
    results = run_distributed(compare_logits, 2, cfg, ckpt, settings["exact_mixed"],
                              str(root / "exact_mixed"), TOKENS, ["parallel.expert=2"])
    for r in results:
        print(f"upcycle exact_mixed at {r['layout']}: max |logit error| {r['max_err']:.3g}")
        assert "ep=2" in r["layout"] and r["max_err"] < 1e-5, r


@pytest.mark.slow
def test_mapping_equals_megatrons_upcycle_state_dict(dense, tiny_data, tmp_path):
    cfg, ckpt = dense
    moe = _moe(tiny_data, tmp_path, router_topk=2, ffn_hidden_size=88, router_pre_softmax=True)
    (diffs,) = run_distributed(megatron_oracle, 1, cfg, ckpt, moe, 7)
    assert any(".local_experts.3.linear_fc1" in k for k in diffs)
    assert max(diffs.values()) == 0.0, {k: v for k, v in diffs.items() if v}


@pytest.mark.slow
@pytest.mark.parametrize("model,message", [
    ({"preset": "tiny", "hidden_size": 128, "moe": {"num_experts": 4}},
     "does not match the MoE config outside the experts: hidden_size 64 (dense) vs 128"),
    ({"preset": "tiny", "num_layers": 2, "vocab_size": 1000, "moe": {"num_experts": 4}},
     "num_layers 4 (dense) vs 2 (MoE config); vocab_size 512 padded to 512 (dense) vs 1000"),
    ({"preset": "tiny"}, "no model.moe section (not a MoE config)"),
    ({"preset": "tiny_moe"}, "model.moe.ffn_hidden_size 64 does not divide the dense ffn_hidden_size 176"),
])
def test_bad_input_is_one_line_naming_it(dense, tmp_path, capsys, model, message):
    import yaml

    from phoenix.cli import main

    _, ckpt = dense
    recipe = tmp_path / "moe.yaml"
    recipe.write_text(yaml.safe_dump({"model": model}))
    assert main(["upcycle", ckpt, str(recipe), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and message in err, err
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_refuses_a_moe_source_and_an_existing_output(dense, upcycled, tmp_path, capsys):
    from phoenix.cli import main

    _, ckpt = dense
    root, _, _ = upcycled
    recipe = str(root / "exact_mixed.yaml")
    assert main(["upcycle", str(root / "exact_mixed"), recipe, str(tmp_path / "out")]) == 2
    assert "is already a MoE checkpoint" in capsys.readouterr().err
    assert main(["upcycle", ckpt, recipe, str(root / "exact_mixed")]) == 2
    assert "already exists; choose a new output folder" in capsys.readouterr().err
