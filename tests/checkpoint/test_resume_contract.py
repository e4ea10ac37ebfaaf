"""Every config change on resume is honoured exactly from the resume step or refused,
naming each key with its old and new value."""

import json

import pytest
import torch
import yaml

from phoenix.checkpoint.resume_contract import check_resume, config_changes
from phoenix.config import ConfigError, build_config, dump_config
from phoenix.testing.distributed import run_distributed
from phoenix.testing.tiny import tiny_config_dict
from phoenix.testing.workers import train_and_record

@pytest.fixture
def saved(tiny_data, tmp_path):
    """(checkpoint dir holding the old config, builder of configs from the same base)."""
    def make(**sections):
        sections["train"] = {"steps": 10, **sections.get("train", {})}
        return build_config(tiny_config_dict(tiny_data, tmp_path / "run", **sections))

    ckpt = tmp_path / "run" / "checkpoints" / "step_000005"
    ckpt.mkdir(parents=True)
    (ckpt / "config.yaml").write_text(dump_config(make()))
    return ckpt, make


def test_free_and_optimizer_changes_are_honoured(saved):
    ckpt, make = saved
    new = make(parallel={"tensor": 2}, logging={"log_interval": 3},
               optim={"adam_beta2": 0.5, "adam_eps": 1e-3, "weight_decay": 0.5, "clip_grad": 0.5})
    decision = check_resume(ckpt, new, 5)
    assert sorted(c.key for c in decision.honoured) == [
        "optim.adam_beta2", "optim.adam_eps", "optim.clip_grad", "optim.weight_decay"]


def test_document_mask_change_is_honoured_and_recorded(saved):
    """Turning the document mask on mid-run changes how samples are presented, not which."""
    ckpt, make = saved
    data = {"document_mask": True, "eod_mask_loss": True}
    decision = check_resume(ckpt, make(data=data), 5)
    assert sorted(c.key for c in decision.honoured) == ["data.document_mask", "data.eod_mask_loss"]
    assert not decision.data_changed


def test_performance_switches_are_honoured(saved):
    """The attention backend, fusions, recompute and overlaps compute the same math to
    rounding: free.
    fp8 rounds more: honoured and recorded. A checkpoint written before these keys existed
    (its config.yaml lacks them) resumes too."""
    ckpt, make = saved
    new = make(model={"preset": "tiny", "attention_backend": "sdpa",
                      "fusions": {"bias_activation": True, "cross_entropy": "native"},
                      "recompute": {"granularity": "full", "method": "block", "num_layers": 2}},
               parallel={"tp_comm_overlap": True, "tensor": 2, "sequence_parallel": True},
               train={"fp8": {"recipe": "tensorwise"}})
    decision = check_resume(ckpt, new, 5)
    assert sorted(c.key for c in decision.honoured) == [
        "train.fp8", "train.fp8.amax_compute_algo", "train.fp8.amax_history_len", "train.fp8.format",
        "train.fp8.recipe"]
    old = yaml.safe_load((ckpt / "config.yaml").read_text())
    del old["model"]["attention_backend"], old["model"]["fusions"], old["train"]["fp8"]
    del old["model"]["recompute"]
    (ckpt / "config.yaml").write_text(yaml.safe_dump(old))
    assert check_resume(ckpt, make(), 5).honoured == []


@pytest.mark.parametrize("sections,expected", [
    ({"optim": {"lr": 1e-3}}, [r"schedule: .*optim\.lr: 0\.003 -> 0\.001",
                               r"step 0 would have been trained with LR 0\.0 instead of 0\.0|"
                               r"step 1 would have been trained with LR"]),
    ({"train": {"steps": 20}}, [r"train\.steps: 10 -> 20", r"add a stage|checkpoint\.init_from"]),
    ({"train": {"seed": 7}}, [r"train\.seed: 1234 -> 7"]),
    ({"model": {"preset": "tiny", "norm_epsilon": 1e-6}},
     [r"model: model\.norm_epsilon: 1e-05 -> 1e-06", r"checkpoint\.init_from"]),
])
def test_refused_changes_name_every_key(saved, sections, expected):
    ckpt, make = saved
    with pytest.raises(ConfigError, match=r"checkpoint\.resume: the config differs") as e:
        check_resume(ckpt, make(**sections), 5)
    for pattern in expected:
        assert any(__import__("re").search(p, str(e.value)) for p in pattern.split("|")), \
            (pattern, str(e.value))


def test_data_changes_of_the_running_stage_are_honoured_or_refused(saved):
    """Mixture and batch size: honoured (an implicit stage boundary, see the e2e test
    below); a dataset's prefix or name, which key its stream: refused."""
    ckpt, make = saved
    d = yaml.safe_load(dump_config(make()))["data"]
    swapped = [{**e, "weight": w} for e, w in zip(d["datasets"], [0.3, 0.7])]
    decision = check_resume(ckpt, make(data={**d, "datasets": swapped},
                                       train={"global_batch_size": 16}), 5)
    assert any("weights" in c for c in decision.data_changed), decision.data_changed
    assert any("global_batch_size: 8 -> 16" in c for c in decision.data_changed)
    renamed = [{**d["datasets"][0], "name": "webtext"}, d["datasets"][1]]
    with pytest.raises(ConfigError, match=r"renamed: 'web' -> 'webtext'"):
        check_resume(ckpt, make(data={**d, "datasets": renamed}), 5)
    moved = [{**d["datasets"][0], "prefix": d["datasets"][1]["prefix"]}, d["datasets"][1]]
    with pytest.raises(ConfigError, match=r"dataset 'web' prefix: "):
        check_resume(ckpt, make(data={**d, "datasets": moved}), 5)


def test_stages_after_the_resume_step_may_change(tiny_data, tmp_path):
    """Appending a stage (with its own LR phases) keeps every past LR and every begun
    stage's data: honoured. Shortening the warmup changes past LRs: refused."""
    def make(stages):
        return build_config(tiny_config_dict(
            tiny_data, tmp_path / "run", train={"steps": None}, stages=stages,
            optim={"schedule": {"peak_lr": 3e-3, "min_lr": 3e-4}, "lr": None, "warmup_steps": 0}))

    mix = {"web": 0.7, "code": 0.3}
    first = {"name": "stable", "steps": 10, "mixture": mix,
             "lr": [{"kind": "warmup", "steps": 2}, {"kind": "constant", "steps": 8}]}
    anneal = {"name": "anneal", "steps": 5, "mixture": {"web": 0.5, "code": 0.5},
              "lr": [{"kind": "decay", "steps": 5, "target_lr": 3e-4}]}
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "config.yaml").write_text(dump_config(make([first])))
    keys = [c.key for c in check_resume(ckpt, make([first, anneal]), 5).honoured]
    assert "train.steps" in keys and all(k == "train.steps" or k.startswith("stages[1].lr")
                                         for k in keys), keys  # logged and recorded
    shorter = {**first, "lr": [{"kind": "warmup", "steps": 1}, {"kind": "constant", "steps": 9}]}
    with pytest.raises(ConfigError, match=r"step 1 would have been trained with LR"):
        check_resume(ckpt, make([shorter]), 5)
    moved = [{**first, "name": "pre", "steps": 1, "lr": [{"kind": "warmup", "steps": 1}]},
             {**first, "steps": 9, "lr": [{"kind": "warmup", "steps": 1},
                                          {"kind": "constant", "steps": 8}]}]
    with pytest.raises(ConfigError, match=r"began stage 'stable' at step 0 but the config "
                                          r"starts it at step 1"):
        check_resume(ckpt, make(moved), 5)


def test_rope_changes_are_honoured_and_recorded(saved, tmp_path):
    """A new model.rope (or a stage's rope) is a context-extension step: honoured on
    resume and recorded; init_from reports it against the source's config."""
    from phoenix.checkpoint.resume_contract import record_changes, rope_changes

    ckpt, make = saved
    yarn = {"base": 1e6, "scaling": "yarn", "factor": 4, "original_max_position_embeddings": 64}
    new = make(model={"preset": "tiny", "rope": yarn})
    honoured = check_resume(ckpt, new, 5).honoured
    keys = sorted(c.key for c in honoured)
    assert keys == ["model.rope.base", "model.rope.factor",
                    "model.rope.original_max_position_embeddings", "model.rope.scaling"], keys
    record_changes(tmp_path, 5, honoured)
    line = json.loads((tmp_path / "config_changes.jsonl").read_text())
    assert line["step"] == 5 and line["changes"]["model.rope.scaling"] == ["none", "yarn"]
    assert sorted(c.key for c in rope_changes(ckpt, new)) == keys
    assert rope_changes(ckpt, make()) == []
    # the rest of the model is still refused
    with pytest.raises(ConfigError, match=r"model\.norm_epsilon"):
        check_resume(ckpt, make(model={"preset": "tiny", "rope": yarn, "norm_epsilon": 1e-6}), 5)


def test_config_changes_lists_leaves(saved):
    _, make = saved
    keys = [c.key for c in config_changes(make(), make(optim={"adam_beta2": 0.5}))]
    assert keys == ["optim.adam_beta2"]


@pytest.mark.slow
def test_resumed_optimizer_uses_the_new_settings(tiny_data, tmp_path):
    """The case of the issue: betas, eps and weight decay changed on resume are what every
    resumed step's optimizer uses, and the change is recorded."""
    run = tiny_config_dict(tiny_data, tmp_path / "run", train={"steps": 8},
                           checkpoint={"save_interval": 4})
    (first,) = run_distributed(train_and_record, 1, run, ["train.stop_at_step=4"])
    new = ["optim.weight_decay=0.5", "optim.adam_beta2=0.5", "optim.adam_eps=0.001"]
    (second,) = run_distributed(train_and_record, 1, run, new)
    assert [s["step"] for s in second["steps"]] == [5, 6, 7, 8]
    before = first["steps"][-1]["groups"]
    assert {b for b, _ in before["betas"]} == {0.9} and {b for _, b in before["betas"]} == {0.95}
    for s in second["steps"]:
        g = s["groups"]
        assert set(g["betas"]) == {(0.9, 0.5)} and set(g["eps"]) == {1e-3}, g
        assert max(g["weight_decay"]) == 0.5, g
    record = [json.loads(line) for line in (tmp_path / "run" / "config_changes.jsonl").open()]
    assert record == [{"step": 4, "changes": {"optim.adam_beta2": [0.95, 0.5],
                                              "optim.adam_eps": [1e-08, 0.001],
                                              "optim.weight_decay": [0.1, 0.5]}}]


def _reads(steps) -> list[tuple[int, int]]:
    return [(d, s) for step in steps for d, s in zip(step["dataset_ids"], step["sample_ids"])]


@pytest.mark.slow
def test_data_change_on_resume_continues_every_stream(tiny_data, tmp_path):
    """The mixture and batch size changed on resume at step 4: from there the run follows the
    new config as if a stage began at step 4 -- exactly the samples a two-stage recipe with
    that boundary reads -- and no sample is read twice."""
    base = tiny_config_dict(tiny_data, tmp_path / "run", train={"steps": 8},
                            checkpoint={"save_interval": 4})
    (first,) = run_distributed(train_and_record, 1, base, ["train.stop_at_step=4"])
    swapped = ["data.datasets[0].weight=0.3", "data.datasets[1].weight=0.7",
               "train.global_batch_size=16"]
    (second,) = run_distributed(train_and_record, 1, base, swapped)
    assert [s["step"] for s in second["steps"]] == [5, 6, 7, 8]
    assert second["consumed_samples"] == 4 * 8 + 4 * 16

    staged = tiny_config_dict(tiny_data, tmp_path / "staged", train={"steps": None}, stages=[
        {"name": "main", "steps": 4, "mixture": {"web": 0.7, "code": 0.3}},
        {"name": "after", "steps": 4, "mixture": {"web": 0.3, "code": 0.7},
         "global_batch_size": 16}])
    (reference,) = run_distributed(train_and_record, 1, staged)
    assert _reads(first["steps"]) == _reads(reference["steps"][:4])
    assert _reads(second["steps"]) == _reads(reference["steps"][4:])
    reads = _reads(first["steps"] + second["steps"])
    assert len(set(reads)) == len(reads)
    # later checkpoints keep the boundary, so a later resume rebuilds the same plans
    bundle = torch.load(tmp_path / "run" / "checkpoints" / "step_000008" / "phoenix_state.pt",
                        weights_only=False)
    assert bundle["states"]["data"]["data_resume"]["step"] == 4


@pytest.mark.slow
def test_dry_run_checks_the_resume(tiny_data, tmp_path):
    """`phoenix train --dry-run` in a run directory with a checkpoint says what a resume
    would honour, and refuses what it would refuse (exit 2, one line), with no work done."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    run = tiny_config_dict(tiny_data, tmp_path / "run", train={"steps": 10})
    ckpt = tmp_path / "run" / "checkpoints" / "step_000005"
    ckpt.mkdir(parents=True)
    (ckpt / "config.yaml").write_text(dump_config(build_config(run)))
    (ckpt / "metadata.json").write_text("{}")
    torch.save({"format": 2, "step": 5, "world_size": 1, "has_optimizer": True,
                "states": {"trainer": {"step": 5}}}, ckpt / "phoenix_state.pt")
    recipe = tmp_path / "run.yaml"
    recipe.write_text(yaml.safe_dump(run))
    root = Path(__file__).resolve().parents[2]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(root), PYTHONWARNINGS="ignore")
    procs = {name: subprocess.Popen([sys.executable, "-m", "phoenix.train", str(recipe), change,
                                     "--dry-run"], cwd=root, env=env, text=True,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for name, change in (("ok", "optim.adam_beta2=0.5"), ("refused", "optim.lr=1e-3"))}
    out = {name: (p.wait(timeout=300), p.stdout.read(), p.stderr.read()) for name, p in procs.items()}
    rc, stdout, stderr = out["ok"]
    assert rc == 0, stderr
    assert f"# would resume {ckpt}" in stderr and "honoured change: optim.adam_beta2: 0.95 -> 0.5" in stderr
    rc, stdout, stderr = out["refused"]
    assert rc == 2 and "Traceback" not in stderr, stderr
    assert "checkpoint.resume: the config differs" in stderr and "optim.lr: 0.003 -> 0.001" in stderr
    assert not (tmp_path / "run" / "config.yaml").exists()  # nothing was written
