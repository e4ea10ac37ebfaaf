"""parallel.virtual_pipeline (interleaved 1F1B): PP=2 x VP=2 trains like one process from
the same weights and data (losses, grad norms, every per-layer norm, named by global
layer, held-out eval), with DP=2 and the data-parallel overlaps on; its checkpoints resume at
PP=1, and one process's at PP=2 x VP=2, continuing the uninterrupted run; the layouts
megatron-core's interleaved schedule would reject are refused up front, by --dry-run too.

The tiny model has 4 layers: at PP=2 x VP=2 rank 0 holds layers 0 and 2, rank 1 layers 1
and 3, one per chunk.
"""

import math
import shutil

import pytest

from phoenix.config import ConfigError
from phoenix.testing.distributed import run_distributed
from phoenix.testing.tiny import tiny_config, tiny_config_dict
from phoenix.testing.workers import train_and_record, train_with_norms

STEPS = 4
VP = ["parallel.pipeline=2", "parallel.virtual_pipeline=2"]
OVERLAP = ["parallel.overlap_grad_reduce=true", "parallel.overlap_param_gather=true",
           "parallel.align_param_gather=true", "parallel.bucket_size=4000"]
NORMS = ("grad_norm/", "param_norm/", "update_norm/", "update_ratio/")


def _scalars(run_dir) -> dict[str, dict[int, float]]:
    """The norm and eval scalars of a run's TensorBoard log: tag -> {step: value}."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from phoenix.monitor.tensorboard import tensorboard_dir

    acc = EventAccumulator(str(tensorboard_dir(run_dir, "tiny")), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]
            if tag.startswith(NORMS + ("eval/",))}


def _config(tiny_data, out, steps=STEPS, evaluate=False, **checkpoint):
    """The dense runs of this file: the vocabulary padded (512 -> 576 rows: the padded-vocab
    mask on the last chunk), checkpoints at steps 2 and 4; ``evaluate``: held-out eval at
    steps 2 and 4 (10 samples: 3 micro-batches of 4, padded to 4 under the interleaved
    schedule)."""
    eval_section = {"sets": [{"name": "code", "prefix": tiny_data.prefixes["code"]}],
                    "interval": 2, "max_samples": 10, "micro_batch_size": 4}
    return tiny_config_dict(
        tiny_data, out, model={"preset": "tiny", "make_vocab_size_divisible_by": 96},
        train={"steps": steps}, logging={"tensorboard": evaluate, "log_interval": 1},
        eval=eval_section if evaluate else None,
        checkpoint={"save_interval": 2, "save_at_end": False,
                    "optimizer_format": "fully_reshardable", **checkpoint})


@pytest.fixture(scope="module")
def reference(tiny_data, tmp_path_factory):
    """One process, norms every step, eval at steps 2 and 4, checkpoints at steps 0
    (weights), 2 and 4."""
    out = tmp_path_factory.mktemp("vp_ref")
    cfg = _config(tiny_data, out, evaluate=True, save_initial=True)
    (result,) = run_distributed(train_with_norms, 1, cfg)
    return out, result["steps"], _scalars(out)


@pytest.fixture(scope="module")
def interleaved(reference, tiny_data, tmp_path_factory):
    """PP=2 x VP=2 x DP=2 with the grad-reduce and (aligned) param-gather overlaps (the
    schedule drives each chunk's grad/param sync through the per-chunk hook lists), from
    the reference's initial weights, checkpoints at steps 2 and 4."""
    out = tmp_path_factory.mktemp("vp_pp2_vp2")
    init = str(reference[0] / "checkpoints" / "step_000000")
    cfg = _config(tiny_data, out, evaluate=True, init_from=init)
    results = run_distributed(train_with_norms, 4, cfg, VP + OVERLAP)
    return out, results, _scalars(out)


def _close(a, b, rel=1e-4):
    return math.isclose(a, b, rel_tol=rel, abs_tol=0.0)


def _assert_steps_match(got_steps, ref_steps, name):
    assert [s["step"] for s in got_steps] == [s["step"] for s in ref_steps], name
    for got, ref in zip(got_steps, ref_steps):
        assert _close(got["loss"], ref["loss"]), (name, got, ref)
        assert _close(got["grad_norm"], ref["grad_norm"]), (name, got, ref)


@pytest.mark.slow
def test_interleaved_trains_like_one_process(reference, interleaved):
    _, ref_steps, ref_norms = reference
    _, results, norms = interleaved
    assert results[0]["layout"].startswith("world=4 tp=1 pp=2 vp=2 dp=2")
    for result in results:  # every rank knows the global numbers
        _assert_steps_match(result["steps"], ref_steps, "pp2_vp2")
    assert ref_steps[0]["loss"] != ref_steps[-1]["loss"]
    assert {"eval/code/loss", "eval/code/top1"} <= set(norms)
    # Every per-layer norm, tagged by the global layer: rank 0 holds layers 0 and 2.
    layers = sorted(t.split("/")[1] for t in norms if t.startswith("grad_norm/layer_")
                    and t.count("/") == 1)
    assert layers == ["layer_00", "layer_01", "layer_02", "layer_03"]
    assert sorted(norms) == sorted(ref_norms)
    bad = [f"{tag} step {step}: {norms[tag][step]} != {want}"
           for tag, values in ref_norms.items() for step, want in values.items()
           if not _close(norms[tag][step], want)]
    assert not bad, "\n".join(bad[:20])


@pytest.mark.slow
def test_interleaved_moe_trains_like_one_process(tiny_data, tmp_path):
    """MoE in chunks of both kinds (layers 1 and 2 MoE: rank 0 holds dense 0 and MoE 2,
    rank 1 MoE 1 and dense 3): losses (with the aux and z losses), grad norms and the MoE
    monitor's per-layer load tags, by global layer, equal one process's."""
    from phoenix.testing.workers import train_with_moe_monitor

    model = {"preset": "tiny_moe", "moe": {"layer_freq": [0, 1, 1, 0], "z_loss_coeff": 1e-3}}
    runs = {}
    for name, world, overrides in (("ref", 1, []), ("vp", 2, VP)):
        cfg = tiny_config_dict(tiny_data, tmp_path / name, model=model, train={"steps": 3},
                               checkpoint={"save_initial": name == "ref", "save_at_end": False,
                                           **({"init_from": str(tmp_path / "ref" / "checkpoints"
                                                                / "step_000000")}
                                              if name == "vp" else {})})
        runs[name] = run_distributed(train_with_moe_monitor, world, cfg, overrides, 1, 0)
    (ref,) = runs["ref"]
    logging = [r for r in runs["vp"] if r["is_logging_rank"]]
    assert len(logging) == 1
    for result in runs["vp"]:
        _assert_steps_match(result["steps"], ref["steps"], "moe_pp2_vp2")
    got, want = logging[0]["moe_last"], ref["moe_last"]
    assert sorted(got) == sorted(want) and any(t.startswith("moe/layer_02/") for t in want)
    bad = [t for t in want if not _close(got[t], want[t]) and abs(got[t] - want[t]) > 1e-6]
    assert not bad, [(t, got[t], want[t]) for t in bad]


RESUMES = {  # name: (saved by, world, overrides of the resumed run)
    "pp2_vp2_to_pp1": ("interleaved", 1, []),
    "pp1_to_pp2_vp2": ("reference", 2, VP),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(RESUMES))
def test_checkpoint_resumes_at_another_virtual_pipeline_size(name, reference, interleaved,
                                                             tiny_data, tmp_path):
    """Step 2's checkpoint (model + optimizer) of one layout resumes at another: steps 3
    and 4 equal the uninterrupted single-process run's."""
    _, ref_steps, _ = reference
    source, world, overrides = RESUMES[name]
    saved = {"reference": reference, "interleaved": interleaved}[source][0]
    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(saved / "checkpoints" / "step_000002", resumed / "checkpoints" / "step_000002")
    cfg = _config(tiny_data, resumed)
    results = run_distributed(train_and_record, world, cfg, overrides)
    for result in results:
        _assert_steps_match(result["steps"], ref_steps[2:], name)


@pytest.mark.parametrize("world,overrides,message", [
    (1, ["parallel.virtual_pipeline=2"],
     "parallel.virtual_pipeline: 2 chunks per rank need parallel.pipeline >= 2 (got 1)"),
    (4, ["parallel.pipeline=2", "parallel.virtual_pipeline=4"],
     "parallel.virtual_pipeline: model.num_layers 4 is not divisible by pipeline x "
     "virtual_pipeline = 2x4"),
    (2, VP + ["train.global_batch_size=6"],
     "parallel.virtual_pipeline: stage 'main' has 3 micro-batches per step"),
    (4, VP + ["train.global_batch_size=12"],  # DP=2: 12 / (2 x 2) = 3 micro-batches
     "parallel.virtual_pipeline: stage 'main' has 3 micro-batches per step"),
])
def test_refused_layouts(world, overrides, message, tiny_data, tmp_path):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        tiny_config(tiny_data, tmp_path, overrides).validate_layout(world)


def test_virtual_pipeline_one_is_off(tiny_data, tmp_path):
    cfg = tiny_config(tiny_data, tmp_path, ["parallel.pipeline=2", "parallel.virtual_pipeline=1"])
    assert cfg.parallel.virtual_pipeline is None and cfg.parallel.chunks == 1


def test_describe_shows_each_chunk_and_the_interleaving_memory(tiny_data, tmp_path):
    from phoenix.train.describe import describe, format_description

    plain = describe(tiny_config(tiny_data, tmp_path, ["parallel.pipeline=2"]), 2, 512)
    vp = describe(tiny_config(tiny_data, tmp_path, VP), 2, 512)
    assert vp["layout"]["pipeline_layers"] == [[[0], [2]], [[1], [3]]]
    assert plain["layout"]["pipeline_layers"] == [[[0, 1]], [[2, 3]]]
    text = format_description(vp)
    assert "TP 1 x PP 2 (VP 2) x CP 1" in text
    assert ("pipeline: 2 stages x 2 chunks (interleaved 1F1B), global layers rank 0: 0, 2 | "
            "rank 1: 1, 3") in text
    # 4 micro-batches: rank 0 holds 2 (1F1B) or 5 chunk forwards of half a stage
    # (interleaved): Megatron-LM's penalty 1 + (PP-1)/(PP*VP) = 1.25.
    a, b = plain["memory_bytes"], vp["memory_bytes"]
    assert a["activations_per_micro_batch"] == b["activations_per_micro_batch"]
    assert b["activations"] == pytest.approx(1.25 * a["activations"], rel=1e-6)
    # Full recompute of 1 layer per block (block method): each chunk is a block, so at
    # VP=2 both of a rank's layers keep only their input, at VP=1 one of the two.
    block = ["model.recompute.granularity=full", "model.recompute.method=block",
             "model.recompute.num_layers=1"]
    a = describe(tiny_config(tiny_data, tmp_path, ["parallel.pipeline=2", *block]), 2, 512)
    b = describe(tiny_config(tiny_data, tmp_path, VP + block), 2, 512)
    kept = a["memory_bytes"]["activations_per_micro_batch"]
    assert b["memory_bytes"]["activations_per_micro_batch"] < kept


def test_dry_run_refuses_and_describes(tiny_data, tmp_path, monkeypatch, capsys):
    import yaml

    from phoenix.train.run import main

    recipe = tmp_path / "vp.yaml"
    recipe.write_text(yaml.safe_dump(tiny_config_dict(tiny_data, tmp_path / "run")))
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main([str(recipe), *VP, "--dry-run"]) == 0
    assert "rank 0: 0, 2 | rank 1: 1, 3" in capsys.readouterr().err
    assert main([str(recipe), *VP, "train.global_batch_size=6", "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert ("phoenix: config error: parallel.virtual_pipeline: stage 'main' has 3 micro-batches "
            "per step") in err and "Traceback" not in err
