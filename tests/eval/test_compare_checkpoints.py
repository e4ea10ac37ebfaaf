"""``phoenix compare-checkpoints`` against a direct torch computation.

Two checkpoints of one tiny run, saved at different layouts (2 steps at PP=2, then 2
more at TP=2, resumed through resharding), are compared; the oracle reads their raw
dist_checkpointing tensors (:func:`phoenix.testing.checkpoints.read_checkpoint_tensors`)
and computes the norms, ratios and cosines itself, for weights and Adam's moments."""

from __future__ import annotations

import csv
import math
import shutil

import pytest
import torch

from phoenix.testing.checkpoints import read_checkpoint_tensors
from phoenix.testing.distributed import run_distributed
from phoenix.testing.tiny import tiny_config_dict
from phoenix.testing.workers import train_and_record


@pytest.fixture(scope="module")
def two_layouts(tiny_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("compare_run")
    cfg = tiny_config_dict(tiny_data, out, train={"steps": 4, "stop_at_step": 2, "global_batch_size": 4},
                           optim={"warmup_steps": 1, "lr": 3.0e-3},
                           checkpoint={"save_interval": 2, "save_at_end": True,
                                       "optimizer_format": "fully_reshardable"})
    run_distributed(train_and_record, 2, cfg, ["parallel.pipeline=2"])
    cfg["train"]["stop_at_step"] = None
    run_distributed(train_and_record, 2, cfg, ["parallel.tensor=2"])
    return out / "checkpoints" / "step_000002", out / "checkpoints" / "step_000004"


def _run(argv, capsys):
    from phoenix.cli.compare_checkpoints import main

    code = main([str(a) for a in argv])
    return code, capsys.readouterr()


def _expected(a: torch.Tensor, b: torch.Tensor) -> dict:
    a, b = a.double().flatten(), b.double().flatten()
    na, nb, d = a.norm().item(), b.norm().item(), (b - a).norm().item()
    return {"norm_a": na, "norm_b": nb, "delta": d, "rel_delta": d / na,
            "cosine": (a @ b).item() / (na * nb)}


@pytest.mark.slow
def test_compare_against_direct_torch(two_layouts, tmp_path, capsys):
    a_dir, b_dir = two_layouts
    code, out = _run([a_dir, b_dir.parent.parent, "--out", tmp_path / "cmp",
                      "--hist", "layer_01/mlp/fc1", "exp_avg:embedding"], capsys)
    assert code == 0, out.err
    assert "layer_03/attention/qkv" in out.out and "exp_avg_sq" in out.out
    with open(tmp_path / "cmp" / "compare.csv") as f:
        rows = {(r["state"], r["key"]): r for r in csv.DictReader(f)}
    assert {r["pair"] for r in rows.values()} == {"compare_run0@2 -> compare_run0@4"}
    A, B = read_checkpoint_tensors(a_dir), read_checkpoint_tensors(b_dir)
    L = "decoder.layers."

    def opt(state, key):
        return f"optimizer.state.{state}.{key}"

    cases = {
        ("weight", "layer_01/attention/qkv"): lambda T: T[L + "self_attention.linear_qkv.weight"][1],
        # the layer's norms: the input and pre-MLP norms, fused into qkv / fc1 here
        ("weight", "layer_02/norms"): lambda T: torch.cat([
            T[L + "self_attention.linear_qkv.layer_norm_weight"][2],
            T[L + "mlp.linear_fc1.layer_norm_weight"][2]]),
        ("weight", "output_layer"): lambda T: T["output_layer.weight"],
        ("weight", "global"): lambda T: torch.cat([v.flatten() for k, v in sorted(T.items())
                                                   if not k.startswith("optimizer.")]),
        ("exp_avg", "layer_03/mlp/fc2"): lambda T: T[opt("exp_avg", L + "mlp.linear_fc2.weight")][3],
        ("exp_avg_sq", "embedding"): lambda T: T[opt("exp_avg_sq", "embedding.word_embeddings.weight")],
    }
    for (state, key), pick in cases.items():
        want, got = _expected(pick(A), pick(B)), rows[(state, key)]
        for field, value in want.items():
            assert math.isclose(float(got[field]), value, rel_tol=1e-6, abs_tol=1e-12), (state, key, field)
    layers = {k.split("/")[0] for s, k in rows if k.startswith("layer_")}
    assert layers == {"layer_00", "layer_01", "layer_02", "layer_03"}
    assert (tmp_path / "cmp" / "heatmap.png").stat().st_size > 0
    assert (tmp_path / "cmp" / "hist.png").stat().st_size > 0


@pytest.mark.slow
def test_compare_refuses_bad_input(two_layouts, tmp_path, capsys):
    import torch.distributed.checkpoint as dcp

    a_dir, b_dir = two_layouts
    code, out = _run([a_dir, tmp_path / "missing", "--out", tmp_path / "x"], capsys)
    assert code == 2 and "missing" in out.err and len(out.err.strip().splitlines()) == 1
    code, out = _run([a_dir, "--out", tmp_path / "x"], capsys)
    assert code == 2 and "at least two" in out.err
    code, out = _run([a_dir, b_dir, "--out", tmp_path / "x", "--hist", "layer_09/mlp/fc1"], capsys)
    assert code == 2 and "--hist layer_09/mlp/fc1" in out.err
    # Another architecture: the same checkpoint with a wider output layer.
    other = tmp_path / "other" / "checkpoints" / "step_000002"
    tensors = read_checkpoint_tensors(a_dir, model_only=True)
    tensors["output_layer.weight"] = torch.zeros(512, 96)
    dcp.save(tensors, checkpoint_id=str(other), no_dist=True)
    for name in ("phoenix_state.pt", "metadata.json"):
        shutil.copy(a_dir / name, other / name)
    code, out = _run([a_dir, other, "--out", tmp_path / "x"], capsys)
    assert code == 2 and "different architectures: output_layer.weight" in out.err, out.err
    assert not (tmp_path / "x").exists()


def test_part_keys_of_checkpoint_tensors():
    """Stacked layers and routed experts are cut as the norm monitor names its parts."""
    from phoenix.eval.compare import split_key

    experts = split_key("decoder.layers.mlp.experts.experts.linear_fc2.weight", (2, 4, 8, 16), 12)
    assert [k for k, _ in experts][:5] == ["layer_00/mlp/expert_00/fc2", "layer_00/mlp/expert_01/fc2",
                                           "layer_00/mlp/expert_02/fc2", "layer_00/mlp/expert_03/fc2",
                                           "layer_01/mlp/expert_00/fc2"]
    assert experts[5][1] == (1, 1)
    assert split_key("decoder.layers.mlp.router.weight", (2, 4, 16), 2)[1] == ("layer_01/mlp/router", 1)
    assert split_key("decoder.layers.mlp.shared_experts.linear_fc1.weight", (2, 8, 16), 2)[0] == \
        ("layer_00/mlp/shared/fc1", 0)
    assert split_key("decoder.layers.3.self_attention.linear_proj.weight", (8, 8), 4) == \
        [("layer_03/attention/proj", None)]
    assert split_key("decoder.final_layernorm.weight", (8,), 4) == [("final_norm", None)]
