"""Continual pretraining: init_from a checkpoint of another layout, optimizer kept or
reset, shape checks, the source left untouched, and the worked recipes run tiny on CPU."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import yaml

from phoenix.testing.distributed import run_distributed
from phoenix.testing.tiny import tiny_config_dict
from phoenix.testing.workers import optimizer_state_after_setup, train_and_record

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]


def _digest(directory: Path) -> dict[str, str]:
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


def _continual(files, out, source, **changes):
    d = tiny_config_dict(files, out, train={"global_batch_size": 8, "micro_batch_size": 2, "seed": 99})
    d["train"].pop("steps")
    d["optim"] = {"lr": 1e-3, "min_lr": 1e-4}
    d["data"]["datasets"] = [{"prefix": files.prefixes[n], "name": n} for n in ("web", "code", "math")]
    d["stages"] = [{"name": "rewarm", "steps": 2, "mixture": {"web": 0.7, "code": 0.3}},
                   {"name": "shift", "steps": 3, "mixture": {"math": 1.0}, "replay": 0.3,
                    "mixture_warmup_steps": 2}]
    d["checkpoint"] = {"init_from": str(source), "save_at_end": False}
    d.update(changes)
    return d


@pytest.fixture(scope="module")
def source(tiny_data, tmp_path_factory):
    """The source run every init_from test reads, trained once: 4 steps at TP=2, with
    checkpoints at steps 2 and 4 (latest). Tests only read it (one of them checks that).
    Its optimizer state is fully_reshardable: init_optimizer loads it at TP=1 (a
    dp_reshardable one is refused there, naming phoenix reshard)."""
    out = tmp_path_factory.mktemp("continual") / "source"
    cfg = tiny_config_dict(tiny_data, out, train={"steps": 4},
                           checkpoint={"save_at_end": True, "save_interval": 2,
                                       "optimizer_format": "fully_reshardable"})
    run_distributed(train_and_record, 2, cfg, ["parallel.tensor=2"])
    return out, cfg


def test_continual_pretraining_from_tp2_checkpoint_into_tp1(tiny_data, source, tmp_path):
    source, source_cfg = source
    before = _digest(source)

    cont = _continual(tiny_data, tmp_path / "cont_tp1", source)
    (tp1,) = run_distributed(train_and_record, 1, cont)
    cont2 = _continual(tiny_data, tmp_path / "cont_tp2", source)
    tp2 = run_distributed(train_and_record, 2, cont2, ["parallel.tensor=2"])[0]
    fresh = _continual(tiny_data, tmp_path / "fresh", source)
    fresh["checkpoint"] = {"save_at_end": False}
    (scratch,) = run_distributed(train_and_record, 1, fresh)

    # The step-1 loss is computed with the loaded weights: same at TP=1 and TP=2, and far
    # from a fresh initialisation's (the source model has trained).
    for a, b in zip(tp1["steps"], tp2["steps"]):
        assert abs(a["loss"] - b["loss"]) <= 1e-4 * abs(a["loss"]), (a, b)
    assert tp1["steps"][0]["loss"] < scratch["steps"][0]["loss"] - 0.05
    assert tp1["stage_starts"] == {"rewarm": 0, "shift": 2} and tp1["step"] == 5
    assert _digest(source) == before   # the source is only read

    # Optimizer: reset by default, or the source's Adam state (resharded) when asked.
    kept = _continual(tiny_data, tmp_path / "kept", source,
                      checkpoint={"init_from": str(source), "init_optimizer": True})
    resumed_source = dict(source_cfg, checkpoint={"resume": True})
    (reset_state,) = run_distributed(optimizer_state_after_setup, 1, cont)
    (kept_state,) = run_distributed(optimizer_state_after_setup, 1, kept)
    (source_state,) = run_distributed(optimizer_state_after_setup, 1, resumed_source)
    assert reset_state["exp_avg"] == 0.0 and reset_state["step"] == 0
    assert source_state["step"] == 4 and source_state["exp_avg"] > 0
    assert kept_state["step"] == 0   # the new run's own step count
    assert kept_state["exp_avg"] == pytest.approx(source_state["exp_avg"], rel=1e-6)
    assert kept_state["exp_avg_sq"] == pytest.approx(source_state["exp_avg_sq"], rel=1e-6)
    assert kept_state["lr"] == reset_state["lr"] == 1e-3   # step 0 of the new schedule


def test_init_from_errors_before_training(tiny_data, source, tmp_path):
    # The shared source's step-2 checkpoint (its global shapes do not depend on its TP=2).
    step2 = source[0] / "checkpoints" / "step_000002"
    wider = _continual(tiny_data, tmp_path / "wider", step2)
    wider["model"] = {"preset": "tiny", "ffn_hidden_size": 192}
    with pytest.raises(RuntimeError, match=r"(?s)the model config does not match checkpoint .*step_000002 "
                                           r"\(\d+ weights? differ.*linear_fc2.weight: the model has "
                                           r"shape \(4, 64, 192\), the checkpoint \(4, 64, 176\)"):
        run_distributed(train_and_record, 1, wider)

    missing = _continual(tiny_data, tmp_path / "missing", tmp_path / "nowhere")
    with pytest.raises(RuntimeError, match=r"checkpoint not found: .*nowhere"):
        run_distributed(train_and_record, 1, missing)

    partial = tmp_path / "partial" / "step_000002"
    partial.mkdir(parents=True)
    (partial / "metadata.json").write_text("{}")   # no phoenix_state.pt: an interrupted copy
    bad = _continual(tiny_data, tmp_path / "bad", partial)
    with pytest.raises(RuntimeError, match=r"no complete checkpoint in .*partial/step_000002"):
        run_distributed(train_and_record, 1, bad)


def _recipe(name: str, files, out: Path, prefixes: dict) -> dict:
    d = yaml.safe_load((ROOT / "configs" / "recipes" / name).read_text())
    d["output_dir"] = str(out)
    d["tokenizer"]["model"] = files.tokenizer_model
    for entry in d["data"]["datasets"]:
        entry["prefix"] = files.prefixes[prefixes[entry["name"]]]
    d["data"]["prefetch_batches"] = 0
    d["logging"] = {"log_interval": 10, "tensorboard": False}
    return d


def test_worked_recipes_run_tiny_on_cpu(tiny_data, tmp_path):
    """configs/recipes/: the two-stage pretrain, then continual pretraining from it at
    another TP layout, with the recipes' stages, replay, warmup, freeze and LR multiplier."""
    two = _recipe("two_stage_pretrain.yaml", tiny_data, tmp_path / "two_stage",
                  {"web": "web", "code": "repos", "math": "math"})
    first = run_distributed(train_and_record, 2, two)[0]
    assert first["step"] == 50 and first["stage_starts"] == {"stable": 0, "anneal": 30}
    losses = [s["loss"] for s in first["steps"]]
    assert losses[-1] < losses[0] - 0.5

    cont = _recipe("continual_pretrain.yaml", tiny_data, tmp_path / "continual",
                   {"web": "web", "code": "repos", "new": "math"})
    cont["checkpoint"]["init_from"] = str(tmp_path / "two_stage")
    second = run_distributed(train_and_record, 2, cont, ["parallel.tensor=2"])[0]
    assert second["step"] == 60
    assert second["stage_starts"] == {"rewarm": 0, "shift": 10, "anneal": 40}
    # Loaded weights: the continual run starts near where the source ended, not at ln(V).
    assert second["steps"][0]["loss"] < losses[0] - 0.5
