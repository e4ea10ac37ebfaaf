"""``logging.wandb``: W&B (offline mode) gets what TensorBoard gets — the same scalar tags
with the same values at the same steps, the images and histograms, the resolved config —
read back from the files W&B writes (phoenix.testing.wandb_files) and from TensorBoard's
own event reader. A resumed job logs into the same W&B run. Without the wandb package the
key is refused with one line."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from phoenix.testing.distributed import run_distributed
from phoenix.testing.tiny import tiny_config_dict
from phoenix.testing.workers import train_and_record

pytestmark = pytest.mark.slow


def _tensorboard_scalars(out: Path) -> dict[int, dict]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    steps: dict[int, dict] = {}
    for folder in {p.parent for p in (out / "tensorboard").rglob("events.out.tfevents*")}:
        acc = EventAccumulator(str(folder), size_guidance={"scalars": 0})
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            for e in acc.Scalars(tag):
                steps.setdefault(e.step, {})[tag] = e.value
    return steps


@pytest.fixture(scope="module")
def runs(tiny_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("wandb_run")
    config = tiny_config_dict(
        tiny_data, out, train={"steps": 4}, checkpoint={"save_at_end": True},
        logging={"log_interval": 2, "tensorboard": True,
                 "wandb": {"project": "phoenix-test", "mode": "offline"}})
    run_distributed(train_and_record, 1, config, ["train.stop_at_step=2"])
    run_distributed(train_and_record, 1, config)
    return out


def test_wandb_has_the_tensorboard_scalars(runs):
    from phoenix.testing import wandb_files

    tb, wb = _tensorboard_scalars(runs), wandb_files.history(runs)
    assert sorted(tb) == sorted(wb) == [2, 4]
    for step, scalars in tb.items():
        assert len(scalars) > 10  # loss, lr, norms, throughput, per-dataset ...
        assert set(scalars) <= set(wb[step]), set(scalars) - set(wb[step])
        for tag, value in scalars.items():  # TensorBoard keeps float32
            assert math.isclose(wb[step][tag], value, rel_tol=1e-6, abs_tol=1e-12), tag


def test_one_wandb_run_per_phoenix_run_with_its_config(runs):
    from phoenix.testing import wandb_files

    ids = wandb_files.run_ids(runs)
    assert len(ids) == 2 and len(set(ids)) == 1  # two jobs, one W&B run
    assert (runs / "wandb_run_id").read_text().strip() == ids[0]
    config = wandb_files.config(runs)
    assert config["train"]["steps"] == 4 and config["logging"]["wandb"]["mode"] == "offline"


def test_refused_without_the_wandb_package(tiny_data, tmp_path, monkeypatch):
    import importlib.util

    from phoenix.config import ConfigError
    from phoenix.testing.tiny import tiny_config

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(ConfigError, match=r"logging\.wandb: the wandb package is not installed"):
        tiny_config(tiny_data, tmp_path, ["logging.wandb={project: p}"])
