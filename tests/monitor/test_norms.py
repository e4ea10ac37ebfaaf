"""Per-layer grad/param/update norms: correct under TP/PP/DP, read back from TensorBoard.

Every layout starts from the same initial weights (saved by a single-process reference
run) and trains on the same data, so each logged norm must equal the single-process
value; the values are read from the event files with TensorBoard's own reader.
"""

import math

import pytest
import torch

from phoenix.monitor.norms import layer_key, layer_part, named_parameter_keys
from phoenix.testing.norm_runs import LAYOUTS, STEPS

NORM_FAMILIES = ("grad_norm/", "param_norm/", "update_norm/", "update_ratio/")


# -- fast: naming ---------------------------------------------------------------------
@pytest.mark.parametrize("name, part", [
    ("input_layernorm.weight", "norms"),
    ("pre_mlp_layernorm.weight", "norms"),
    ("self_attention.q_layernorm.weight", "norms"),
    ("self_attention.linear_qkv.layer_norm_weight", "norms"),  # Transformer Engine spec
    ("mlp.linear_fc1.layer_norm_bias", "norms"),
    ("self_attention.linear_qkv.weight", "attention/qkv"),
    ("self_attention.linear_qkv.bias", "attention/qkv"),
    ("self_attention.linear_proj.weight", "attention/proj"),
    ("mlp.linear_fc1.weight", "mlp/fc1"),
    ("mlp.linear_fc2.weight", "mlp/fc2"),
    ("mlp.router.weight", "mlp/router"),  # MoE: tests/monitor/test_moe_monitor.py
])
def test_layer_part(name, part):
    assert layer_part(name) == part


def test_layer_key_is_zero_padded():
    assert layer_key(7, 32) == "layer_07"
    assert layer_key(0, 4) == "layer_00"
    assert layer_key(7, 128) == "layer_007"


def test_layer_keys_come_from_layer_number_not_the_name():
    """A second pipeline stage's first local layer (``decoder.layers.0``) is layer 2."""

    class Layer(torch.nn.Module):
        def __init__(self, layer_number):
            super().__init__()
            self.layer_number = layer_number
            self.input_layernorm = torch.nn.LayerNorm(4)
            self.mlp = torch.nn.Module()
            self.mlp.linear_fc1 = torch.nn.Linear(4, 4, bias=False)

    class Stage(torch.nn.Module):  # last stage of PP=2 for a 4-layer model
        def __init__(self):
            super().__init__()
            self.decoder = torch.nn.Module()
            self.decoder.layers = torch.nn.ModuleList([Layer(3), Layer(4)])
            self.decoder.final_layernorm = torch.nn.LayerNorm(4, bias=False)
            self.output_layer = torch.nn.Linear(4, 8, bias=False)

    keys = {name: key for key, name, _ in named_parameter_keys(Stage(), num_layers=4)}
    assert keys == {
        "decoder.layers.0.input_layernorm.weight": "layer_02/norms",
        "decoder.layers.0.input_layernorm.bias": "layer_02/norms",
        "decoder.layers.0.mlp.linear_fc1.weight": "layer_02/mlp/fc1",
        "decoder.layers.1.input_layernorm.weight": "layer_03/norms",
        "decoder.layers.1.input_layernorm.bias": "layer_03/norms",
        "decoder.layers.1.mlp.linear_fc1.weight": "layer_03/mlp/fc1",
        "decoder.final_layernorm.weight": "final_norm",
        "output_layer.weight": "output_layer",
    }


# -- slow: real multi-process runs (tests/monitor/conftest.py) ---------------------------
def _norm_tags(scalars: dict) -> dict:
    return {t: v for t, v in scalars.items() if t.startswith(NORM_FAMILIES)}


def _close(a, b, rel):
    return math.isclose(a, b, rel_tol=rel, abs_tol=0.0)


def _check_parts_sum_to_global(scalars):
    """Squares of every reported grad part = square of megatron's global grad norm."""
    parts = [t for t in scalars if t.startswith("grad_norm/") and t != "grad_norm/global"
             and not (t.startswith("grad_norm/layer_") and t.count("/") == 1)]
    assert {"grad_norm/embedding", "grad_norm/final_norm", "grad_norm/output_layer",
            "grad_norm/layer_00/attention/qkv", "grad_norm/layer_03/mlp/fc2"} <= set(parts)
    megatron = dict(scalars["1_train/grad_norm"])
    assert sorted(megatron) == list(range(1, STEPS + 1))
    for step, norm in megatron.items():
        total = sum(dict(scalars[t])[step] ** 2 for t in parts)
        assert _close(total, norm ** 2, 1e-5), (step, math.sqrt(total), norm)
        assert _close(dict(scalars["grad_norm/global"])[step], norm, 1e-5)
        layers = sum(dict(scalars[f"grad_norm/layer_{i:02d}"])[step] ** 2 for i in range(4))
        layer_parts = sum(dict(scalars[t])[step] ** 2 for t in parts
                          if t.startswith("grad_norm/layer_"))
        assert _close(layers, layer_parts, 1e-5)


@pytest.mark.slow
def test_reference_norms(norms_reference):
    _, scalars, _, _ = norms_reference
    norms = _norm_tags(scalars)
    for family in NORM_FAMILIES:  # the tag names
        for key in ("layer_00", "layer_03/mlp/fc1", "layer_03/attention/qkv",
                    "layer_01/attention/proj", "layer_02/norms", "embedding", "final_norm",
                    "output_layer", "global"):
            assert f"{family}{key}" in norms, f"{family}{key}"
    for tag, values in norms.items():
        assert [s for s, _ in values] == list(range(1, STEPS + 1)), tag
        assert all(math.isfinite(v) and v >= 0 for _, v in values), tag
    # Warm-up starts at LR 0: no update at step 1, then the weights move.
    update = dict(norms["update_norm/global"])
    assert update[1] == 0.0 and update[2] > 0 and update[3] > 0
    _check_parts_sum_to_global(scalars)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(LAYOUTS))
def test_layout_norms_match_single_process(name, norms_reference, norms_layout_runs):
    _, ref_scalars, _, _ = norms_reference
    scalars, _ = norms_layout_runs(name)
    ref, got = _norm_tags(ref_scalars), _norm_tags(scalars)
    assert sorted(got) == sorted(ref)
    bad = []
    for tag, ref_values in ref.items():
        for (step, want), (got_step, value) in zip(ref_values, got[tag]):
            assert step == got_step, tag
            if not _close(value, want, 1e-4):
                bad.append(f"{tag} step {step}: {value} != {want}")
    assert not bad, f"{name}: {len(bad)} values differ from one process:\n" + "\n".join(bad[:20])
    _check_parts_sum_to_global(scalars)


@pytest.mark.slow
def test_layer_names_are_global_under_pipeline_parallel(norms_layout_runs):
    scalars, results = norms_layout_runs("pp2")
    assert [r["is_logging_rank"] for r in results] == [False, True]
    layers = sorted(t.split("/")[1] for t in scalars
                    if t.startswith("grad_norm/layer_") and t.count("/") == 1)
    assert layers == ["layer_00", "layer_01", "layer_02", "layer_03"]
    for tag, values in _norm_tags(scalars).items():  # one value per step, none twice
        assert [s for s, _ in values] == list(range(1, STEPS + 1)), tag


@pytest.mark.slow
def test_logging_norms_does_not_change_training(norms_layout_runs):
    """Norms and optimizer-state norms at every step vs none at all: bit-identical losses
    and grad norms on every rank, with the distributed optimizer (whose grad-buffer and
    state shards the monitors read)."""
    for name in ("dp2",):
        _, with_norms = norms_layout_runs(name, norm_interval=1)
        without_scalars, without = norms_layout_runs(name, norm_interval=0)
        assert not _norm_tags(without_scalars)
        assert not [t for t in without_scalars if t.startswith("adam_")]
        for a, b in zip(with_norms, without):
            assert [(s["loss"], s["grad_norm"]) for s in a["steps"]] == \
                   [(s["loss"], s["grad_norm"]) for s in b["steps"]], name
