"""The training runs the per-layer norm tests share (tests/monitor/conftest.py).

tests/monitor/test_norms.py (gradients, weights, updates), test_optimizer_state_norms.py
(Adam's state) and test_moe_monitor.py read the same few multi-process runs, trained once
per test session: a single-process reference that saves its initial weights, then every
parallel layout from those weights, each with every norm monitor at every step, and the
values read back from the event files with TensorBoard's own reader.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from phoenix.monitor.tensorboard import tensorboard_dir

ROOT = Path(__file__).resolve().parents[2]
STEPS = 3
"""Optimizer steps of every run."""
LAYOUTS = {
    "tp2": (2, ["parallel.tensor=2"]),
    "pp2": (2, ["parallel.pipeline=2"]),
    "dp2": (2, []),  # distributed optimizer (the default): grads from owned shards
    "dp2_no_distopt": (2, ["parallel.use_distributed_optimizer=false"]),
    "tp2_pp2": (4, ["parallel.tensor=2", "parallel.pipeline=2"]),
}
"""Dense layouts: name -> (world size, overrides)."""


def tb_scalars(run_dir: Path, name: str = "tiny") -> dict[str, list[tuple[int, float]]]:
    """Every scalar of the run's one event file: tag -> [(step, value)]."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tb = tensorboard_dir(run_dir, name)
    assert len(list(tb.glob("events.out.tfevents.*"))) == 1, "exactly one writer"
    acc = EventAccumulator(str(tb), size_guidance={"scalars": 0})  # 0: keep every event
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def train_dense(tiny_data, out: Path, world: int, overrides=(), norm_interval=1, **sections):
    """The tiny model for :data:`STEPS` steps with TensorBoard, the norm monitors and the
    optimizer-state norm monitor every ``norm_interval`` steps (0: neither)."""
    from phoenix.testing.distributed import run_distributed
    from phoenix.testing.tiny import tiny_config_dict
    from phoenix.testing.workers import train_with_norms

    cfg = tiny_config_dict(tiny_data, out, train={"steps": STEPS},
                           logging={"tensorboard": True, "log_interval": 1}, **sections)
    return run_distributed(train_with_norms, world, cfg, list(overrides), norm_interval,
                           norm_interval)


def moe_recipe(tiny_data, out: Path) -> dict:
    """configs/quickstart_moe.yaml on the tiny test data, shortened to :data:`STEPS`."""
    recipe = yaml.safe_load((ROOT / "configs/quickstart_moe.yaml").read_text())
    recipe["output_dir"] = str(out)
    recipe["tokenizer"]["model"] = tiny_data.tokenizer_model
    for entry in recipe["data"]["datasets"]:
        entry["prefix"] = tiny_data.prefixes[entry["name"]]
        entry.pop("group_mode", None)  # whole repositories do not fit 3 tiny batches
    recipe["data"].update(seq_length=64, prefetch_batches=0)
    recipe["train"].update(steps=STEPS, global_batch_size=8)
    recipe["optim"].update(warmup_steps=1)
    recipe["logging"].update(log_interval=1)
    recipe["eval"] = None
    return recipe


def moe_events(run_dir: Path) -> tuple[dict, list[str]]:
    """(tag -> {step: value}, histogram tags) of a quickstart_moe run."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tensorboard_dir(run_dir, "quickstart_moe")),
                           size_guidance={"scalars": 0, "histograms": 0})
    acc.Reload()
    scalars = {tag: dict((e.step, e.value) for e in acc.Scalars(tag)) for tag in acc.Tags()["scalars"]}
    return scalars, acc.Tags()["histograms"]


def train_moe(recipe, world, overrides=(), moe_interval=1, norm_interval=1):
    """``recipe`` with the MoE monitor every ``moe_interval`` steps and the norm and
    optimizer-state norm monitors every ``norm_interval`` steps (0: off)."""
    from phoenix.testing.distributed import run_distributed
    from phoenix.testing.workers import train_with_moe_monitor

    return run_distributed(train_with_moe_monitor, world, recipe, list(overrides),
                           moe_interval, norm_interval, norm_interval)
