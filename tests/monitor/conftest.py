"""The runs the per-layer norm tests share, trained once per session (see
phoenix.testing.norm_runs): test_norms.py, test_optimizer_state_norms.py and
test_moe_monitor.py read them."""

import pytest

from phoenix.testing.norm_runs import LAYOUTS, moe_events, moe_recipe, tb_scalars, train_dense, train_moe


@pytest.fixture(scope="session")
def norms_reference(tiny_data, tmp_path_factory):
    """Single process, every norm monitor every step; saves its initial weights
    (step_000000). ``(initial weights, scalars, result, run folder)``."""
    out = tmp_path_factory.mktemp("norms_ref")
    (result,) = train_dense(tiny_data, out, 1,
                            checkpoint={"save_initial": True, "save_at_end": False})
    return out / "checkpoints" / "step_000000", tb_scalars(out), result, out


@pytest.fixture(scope="session")
def norms_layout_runs(norms_reference, tiny_data, tmp_path_factory):
    """Each dense layout trained once from the reference's initial weights (lazily,
    cached): ``run(name, norm_interval=1) -> (scalars, results)``."""
    init = norms_reference[0]
    cache = {}

    def run(name, norm_interval=1):
        if (name, norm_interval) not in cache:
            world, overrides = LAYOUTS[name]
            out = tmp_path_factory.mktemp(f"norms_{name}_{norm_interval}")
            results = train_dense(tiny_data, out, world, overrides, norm_interval,
                                  checkpoint={"init_from": str(init), "save_at_end": False})
            assert results[0]["layout"].startswith(f"world={world}")
            cache[name, norm_interval] = (tb_scalars(out), results)
        return cache[name, norm_interval]

    return run


@pytest.fixture(scope="session")
def moe_runs(tiny_data, tmp_path_factory):
    """configs/quickstart_moe.yaml: the single-process reference (EP=1, saves its initial
    weights), then at EP=2 from those weights with every monitor, without them, and with
    the norm monitors only and no distributed optimizer. ``name -> ((scalars,
    histogram tags), results)``."""
    ref_dir = tmp_path_factory.mktemp("moe_ref")
    ref = moe_recipe(tiny_data, ref_dir)
    ref["checkpoint"] = {"save_initial": True, "save_at_end": False}
    (ref_result,) = train_moe(ref, 1, ["parallel.expert=1"])
    init = str(ref_dir / "checkpoints" / "step_000000")
    out = {"ref": (moe_events(ref_dir), [ref_result])}
    for name, intervals, overrides in (
            ("ep2", (1, 1), []), ("ep2_off", (0, 0), []),
            # expert weights replicated in full on their expert-DP ranks (no optimizer shards)
            ("ep2_no_distopt", (0, 1), ["parallel.use_distributed_optimizer=false"])):
        run_dir = tmp_path_factory.mktemp(name)
        recipe = moe_recipe(tiny_data, run_dir)
        recipe["checkpoint"] = {"init_from": init, "save_at_end": False}
        results = train_moe(recipe, 2, overrides, *intervals)
        assert "ep=2" in results[0]["layout"], results[0]["layout"]
        out[name] = (moe_events(run_dir), results)
    return out
