"""The checkpoint bundle's format version: format 1 (before the checkpointer) still
resumes exactly, and what cannot be converted is refused naming its version."""

import shutil
from types import SimpleNamespace

import pytest
import torch

from phoenix.checkpoint.checkpointer import FORMAT_VERSION, upgrade_bundle
from phoenix.checkpoint.store import STATE_FILE, CheckpointError
from phoenix.config import build_config
from phoenix.testing.distributed import run_distributed
from phoenix.testing.tiny import tiny_config_dict
from phoenix.testing.workers import train_and_record


def _megatron_scheduler_state(cfg, steps: int) -> dict:
    """What format 1 saved for a run without LR phases: megatron's own scheduler state."""
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    o = cfg.optim
    decay = o.decay_steps or cfg.train.steps
    sched = OptimizerParamScheduler(
        SimpleNamespace(param_groups=[{}]), init_lr=0.0, max_lr=o.lr, min_lr=o.min_lr,
        lr_warmup_steps=o.warmup_steps, lr_decay_steps=max(decay, o.warmup_steps + 1),
        lr_decay_style=o.decay_style, start_wd=o.weight_decay, end_wd=o.weight_decay,
        wd_incr_steps=max(decay, 1), wd_incr_style="constant",
        use_checkpoint_opt_param_scheduler=True, override_opt_param_scheduler=False,
        wsd_decay_steps=o.wsd_decay_steps, lr_wsd_decay_style=o.wsd_decay_style)
    for _ in range(steps):
        sched.step(increment=1)
    return sched.state_dict()


def _as_format_1(bundle: dict, cfg) -> dict:
    """A format-2 bundle rewritten in format 1's layout (top-level sections, callbacks by
    class name, the loader's own position and the config text)."""
    states = bundle["states"]
    step = states["trainer"]["step"]
    return {"trainer": states["trainer"], "scheduler": _megatron_scheduler_state(cfg, step),
            "data": {"step": step, "consumed_samples": states["trainer"]["consumed_samples"]},
            "config": "", "callbacks": {"DatasetLossMonitor": states["dataset_loss"]}
            if "dataset_loss" in states else {},
            "world_size": bundle["world_size"], "has_optimizer": bundle["has_optimizer"]}


def _cfg(tiny_data, tmp_path, **optim):
    return build_config(tiny_config_dict(tiny_data, tmp_path / "run", train={"steps": 6},
                                         optim={"warmup_steps": 2, **optim}))


def _v1(cfg, step=3):
    states = {"trainer": {"step": step, "consumed_samples": 24, "consumed_tokens": 0,
                          "skipped_steps": 0, "stage_starts": {"main": 0}},
              "dataset_loss": {"tokens": {"web": 10}}}
    return _as_format_1({"states": states, "world_size": 1, "has_optimizer": True}, cfg)


def test_format_1_is_converted(tiny_data, tmp_path):
    cfg = _cfg(tiny_data, tmp_path)
    up = upgrade_bundle(_v1(cfg), tmp_path, cfg)
    assert up["format"] == FORMAT_VERSION and up["step"] == 3
    assert up["states"]["dataset_loss"] == {"tokens": {"web": 10}}
    assert up["states"]["scheduler"]["num_steps"] == 3
    assert up["states"]["scheduler"]["schedule_fingerprint"] == cfg.resolved.schedule.fingerprint()


def test_format_1_with_other_lr_settings_is_refused(tiny_data, tmp_path):
    v1 = _v1(_cfg(tiny_data, tmp_path))
    changed = _cfg(tiny_data, tmp_path, lr=1e-2)
    with pytest.raises(CheckpointError, match=r"format version 1 .*max_lr 0\.\d+ -> 0\.01"):
        upgrade_bundle(v1, tmp_path, changed)


def test_format_2_data_resume_moves_to_the_data_key(tiny_data, tmp_path):
    """Format 2 kept the data layer's implicit stage boundary inside the trainer's state;
    format 3 keys it "data", and the trainer's state no longer has the field."""
    boundary = {"step": 4, "start_sample": 32, "streams": {"web": [64, False, 20, 100]}}
    v2 = {"format": 2, "step": 6, "world_size": 1, "has_optimizer": True,
          "states": {"trainer": {"step": 6, "consumed_samples": 48, "data_resume": boundary},
                     "scheduler": {}}}
    up = upgrade_bundle(v2, tmp_path, _cfg(tiny_data, tmp_path))
    assert up["format"] == FORMAT_VERSION == 3 and up["step"] == 6
    assert up["states"]["data"] == {"data_resume": boundary}
    assert up["states"]["trainer"] == {"step": 6, "consumed_samples": 48}
    assert v2["states"]["trainer"]["data_resume"] == boundary  # the input is not changed


def test_unknown_format_is_refused(tiny_data, tmp_path):
    cfg = _cfg(tiny_data, tmp_path)
    with pytest.raises(CheckpointError, match=r"has format version 7; .* reads versions 1 to 3"):
        upgrade_bundle({"format": 7, "states": {}}, tmp_path, cfg)
    with pytest.raises(CheckpointError, match=r"format version 1\) has no trainer state"):
        upgrade_bundle({"scheduler": {}}, tmp_path, cfg)


@pytest.mark.slow
def test_format_1_checkpoint_resumes_exactly(tiny_data, tmp_path):
    """Steps 4-6 resumed from a format-1 copy of a checkpoint equal those resumed from the
    format-2 original, bit for bit. (Format-1 checkpoints held the optimizer state
    fully_reshardable, the only format then.)"""
    split = tiny_config_dict(tiny_data, tmp_path / "v2", train={"steps": 6},
                             optim={"warmup_steps": 2},
                             checkpoint={"save_interval": 3, "save_at_end": False,
                                         "optimizer_format": "fully_reshardable"})
    run_distributed(train_and_record, 1, split, ["train.stop_at_step=3"])
    old = tmp_path / "v1" / "checkpoints" / "step_000003"
    shutil.copytree(tmp_path / "v2" / "checkpoints" / "step_000003", old)
    bundle = torch.load(old / STATE_FILE, weights_only=False)
    torch.save(_as_format_1(bundle, build_config(split)), old / STATE_FILE)

    (from_v2,) = run_distributed(train_and_record, 1, split)
    (from_v1,) = run_distributed(train_and_record, 1, {**split, "output_dir": str(tmp_path / "v1")})
    assert [s["step"] for s in from_v1["steps"]] == [4, 5, 6]
    assert from_v1["steps"] == from_v2["steps"]
