"""A multi-phase schedule drives training: every step trains with ``lr_at(step)``, and a
resume in the middle of a phase continues the same curve."""

import pytest

from phoenix.config import build_config
from phoenix.config.schedule import resolve
from phoenix.testing.distributed import run_distributed
from phoenix.testing.tiny import tiny_config_dict
from phoenix.testing.workers import train_and_record

pytestmark = pytest.mark.slow

SCHEDULE = {"peak_lr": 3.0e-3, "min_lr": 3.0e-4, "phases": [
    {"kind": "warmup", "steps": 2},
    {"kind": "constant", "steps": 1},
    {"kind": "decay", "steps": 2, "target_lr": 1.0e-3, "shape": "cosine"},
    {"kind": "constant", "steps": 1, "name": "hold"},
]}


def _config(tiny_data, out):
    return tiny_config_dict(tiny_data, out, train={"steps": 6},
                            optim={"schedule": SCHEDULE, "lr": None, "warmup_steps": 0},
                            checkpoint={"save_at_end": True})


def test_training_follows_the_multi_phase_schedule(tiny_data, tmp_path):
    cfg = _config(tiny_data, tmp_path / "full")
    resolved = resolve(build_config(cfg).optim.schedule, build_config(cfg).resolved.tokens_per_step,
                       total_steps=6)
    (full,) = run_distributed(train_and_record, 1, cfg)
    assert [s["lr"] for s in full["steps"]] == [resolved.lr_at(k) for k in range(6)]
    assert full["steps"][0]["lr"] == 0.0 and full["steps"][2]["lr"] == 3.0e-3

    split = _config(tiny_data, tmp_path / "split")
    (first,) = run_distributed(train_and_record, 1, split, ["train.stop_at_step=4"])
    (second,) = run_distributed(train_and_record, 1, split)
    resumed = first["steps"] + second["steps"]
    assert [s["lr"] for s in resumed] == [s["lr"] for s in full["steps"]]
    assert [s["loss"] for s in resumed] == pytest.approx([s["loss"] for s in full["steps"]], abs=1e-6)
