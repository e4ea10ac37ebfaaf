"""MoE layers train the same at every expert-parallel layout as in one process, from the
same weights and data; a checkpoint saved at EP=2 resumes at EP=1."""

import shutil

import pytest

from phoenix.testing.distributed import run_distributed
from phoenix.testing.tiny import tiny_config_dict
from phoenix.testing.workers import train_and_record

from tests.train.test_layout_parity import _close, assert_steps_match_reference

pytestmark = pytest.mark.slow

# 2 layers of 4 experts (top-2, width 64, aux loss 1e-2, z-loss 1e-3): the tiny_moe preset,
# shortened.
# "mixed": a dense first layer and a MoE second one (moe.layer_freq), so with PP=2 the
# stages hold different layer kinds.
VARIANTS = {"moe": {"preset": "tiny_moe", "num_layers": 2, "moe": {"z_loss_coeff": 1e-3}},
            "mixed": {"preset": "tiny_moe", "num_layers": 2, "moe": {"layer_freq": [0, 1]}}}

LAYOUTS = {
    "ep2": ("moe", 2, ["parallel.expert=2"]),
    "ep2_dp2": ("moe", 4, ["parallel.expert=2"]),  # 4 DP ranks: 2 EP x 2 expert-DP
    # MoE under TP needs sequence parallelism (phoenix's SP norms on the local spec)
    "tp2_ep2": ("moe", 4, ["parallel.tensor=2", "parallel.expert=2",
                           "parallel.sequence_parallel=true"]),
    "mixed_ep2_pp2": ("mixed", 4, ["parallel.expert=2", "parallel.pipeline=2"]),
}


def _config(tiny_data, out, variant, **sections):
    return tiny_config_dict(tiny_data, out, model=VARIANTS[variant], **sections)


@pytest.fixture(scope="module")
def references(tiny_data, tmp_path_factory):
    """Per variant, a single-process run that also saves its initial weights."""
    refs = {}
    for variant in VARIANTS:
        out = tmp_path_factory.mktemp(f"ref_{variant}")
        cfg = _config(tiny_data, out, variant, train={"steps": 3},
                      checkpoint={"save_initial": True, "save_at_end": False})
        (result,) = run_distributed(train_and_record, 1, cfg)
        refs[variant] = (out / "checkpoints" / "step_000000", result["steps"])
    return refs


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_moe_layout_matches_single_process(name, references, tiny_data, tmp_path):
    variant, world, overrides = LAYOUTS[name]
    init, ref_steps = references[variant]
    cfg = _config(tiny_data, tmp_path / name, variant, train={"steps": 3},
                  checkpoint={"init_from": str(init), "save_at_end": False})
    results = run_distributed(train_and_record, world, cfg, overrides)
    assert "ep=2" in results[0]["layout"], results[0]["layout"]
    assert_steps_match_reference(name, results, ref_steps)


def test_moe_checkpoint_reshards_from_ep2_to_ep1(tiny_data, tmp_path):
    """Save at EP=2 after 2 steps, resume at EP=1: step 3 matches the uninterrupted EP=2 run
    (optimizer state fully_reshardable: it loads at any layout)."""
    cfg = _config(tiny_data, tmp_path / "saved", "moe", train={"steps": 3},
                  checkpoint={"save_interval": 2, "save_at_end": False,
                              "optimizer_format": "fully_reshardable"})
    reference = run_distributed(train_and_record, 2, cfg, ["parallel.expert=2"])[0]

    resumed_dir = tmp_path / "resharded" / "checkpoints"
    resumed_dir.mkdir(parents=True)
    shutil.copytree(tmp_path / "saved" / "checkpoints" / "step_000002", resumed_dir / "step_000002")
    cfg2 = _config(tiny_data, tmp_path / "resharded", "moe", train={"steps": 3})
    (resumed,) = run_distributed(train_and_record, 1, cfg2)

    assert [s["step"] for s in resumed["steps"]] == [3]
    a, b = reference["steps"][2], resumed["steps"][0]
    assert _close(a["loss"], b["loss"]), (a, b)
    assert _close(a["grad_norm"], b["grad_norm"]), (a, b)
