"""TP/PP/DP layouts train exactly like one process from the same weights and data."""

import math

import pytest

from phoenix.testing.distributed import run_distributed
from phoenix.testing.tiny import tiny_config_dict
from phoenix.testing.workers import train_and_record

pytestmark = pytest.mark.slow

LAYOUTS = {
    "tp2": (2, ["parallel.tensor=2"]),
    "pp2": (2, ["parallel.pipeline=2"]),
    "dp2": (2, []),
    "tp2_pp2": (4, ["parallel.tensor=2", "parallel.pipeline=2"]),
}


@pytest.fixture(scope="module")
def reference(tiny_data, tmp_path_factory):
    """Single-process run that also saves its initial weights (step_000000)."""
    out = tmp_path_factory.mktemp("ref")
    cfg = tiny_config_dict(tiny_data, out, train={"steps": 3},
                           checkpoint={"save_initial": True, "save_at_end": False})
    (result,) = run_distributed(train_and_record, 1, cfg)
    return out / "checkpoints" / "step_000000", result["steps"]


def _close(a, b, rel=1e-4):
    return math.isclose(a, b, rel_tol=rel, abs_tol=0.0)


def assert_steps_match_reference(name: str, results: list[dict], ref_steps: list[dict]) -> None:
    """Every rank's 3 recorded steps have the reference's loss and grad norm (1e-4), and
    the reference really trained (its loss moved). Also used by the MoE parity tests."""
    for result in results:  # every rank agrees on the global numbers
        steps = result["steps"]
        assert [s["step"] for s in steps] == [1, 2, 3]
        for got, ref in zip(steps, ref_steps):
            assert _close(got["loss"], ref["loss"]), (name, got, ref)
            assert _close(got["grad_norm"], ref["grad_norm"]), (name, got, ref)
    assert ref_steps[0]["loss"] != ref_steps[-1]["loss"]


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_layout_matches_single_process(name, reference, tiny_data, tmp_path):
    init, ref_steps = reference
    world, overrides = LAYOUTS[name]
    cfg = tiny_config_dict(tiny_data, tmp_path / name, train={"steps": 3},
                           checkpoint={"init_from": str(init), "save_at_end": False})
    results = run_distributed(train_and_record, world, cfg, overrides)
    assert results[0]["layout"].startswith(f"world={world}")
    assert_steps_match_reference(name, results, ref_steps)
