"""Per-dataset loss and tokens, read back from TensorBoard, against an independent oracle.

The oracle replays every global batch of a single-process run through a plain forward
of the model from the weights that step trained at (snapshots taken by a callback) and
computes the float64 cross entropy per dataset itself: it shares neither the loss
function nor ``batch_report`` with the monitor. A DP=2 run from the same initial weights
must log the same values (its per-rank reports are summed over data parallel).
"""

import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from phoenix.monitor.base import MetricsCollector
from phoenix.monitor.dataset_loss import DatasetLossMonitor, dataset_tags, per_dataset_sums
from phoenix.monitor.tensorboard import TensorBoardLogger, tensorboard_dir

STEPS = 3
NAMES = ["web", "code"]


# -- fast: the monitor with a stand-in trainer (one process, no collectives) -----------
class FakeWriter:
    def __init__(self):
        self.scalars = {}

    def add_scalar(self, tag, value, step):
        self.scalars.setdefault(tag, []).append((step, float(value)))


def _report(rows):
    """rows: (dataset_id, loss_sum, tokens) per sample."""
    return {"per_sample": torch.tensor([[s, t] for _, s, t in rows], dtype=torch.float64),
            "dataset_id": torch.tensor([d for d, _, _ in rows]),
            "sample_id": torch.arange(len(rows))}


def _fake_trainer(steps):
    tb = TensorBoardLogger("/nonexistent")  # the sink, writing to a fake writer
    tb.writer = FakeWriter()
    layout = SimpleNamespace(world_size=1, dp_size=1, is_last_stage=True, is_logging_rank=True,
                             device=torch.device("cpu"))
    cfg = SimpleNamespace(train=SimpleNamespace(steps=steps), data=SimpleNamespace(
        datasets=[SimpleNamespace(display_name=n) for n in NAMES]))
    return SimpleNamespace(cfg=cfg, layout=layout, state=SimpleNamespace(step=0),
                           callbacks=[tb], batch_report={}), tb.writer


def _step(mon, trainer, step, rows):
    trainer.batch_report = _report(rows)
    trainer.metrics = MetricsCollector(step, last_step=trainer.cfg.train.steps)
    mon.on_step_end(trainer, SimpleNamespace(step=step))
    for sink in trainer.callbacks:  # as the trainer does after every on_step_end
        sink.log_metrics(trainer, trainer.metrics)
    trainer.state.step = step


def test_per_dataset_sums():
    sums = per_dataset_sums(_report([(1, 2.0, 4), (0, 1.0, 2), (1, 6.0, 4)]), 3)
    assert sums.tolist() == [[1.0, 2.0], [8.0, 8.0], [0.0, 0.0]]
    tags = dataset_tags(["a", "b", "c"], sums, torch.tensor([5.0, 8.0, 0.0]))
    assert tags == {"2_datasets/loss/a": 0.5, "2_datasets/loss/b": 1.0,
                    "2_datasets/tokens/a": 5.0, "2_datasets/tokens/b": 8.0,
                    "2_datasets/tokens/c": 0.0}
    with pytest.raises(ValueError):
        per_dataset_sums(_report([(3, 1.0, 1)]), 3)


def test_interval_absence_cumulative_tokens_and_resume():
    trainer, writer = _fake_trainer(steps=5)
    mon = DatasetLossMonitor(interval=2)
    mon.on_train_start(trainer)
    _step(mon, trainer, 1, [(0, 3.0, 2), (1, 4.0, 1)])
    _step(mon, trainer, 2, [(0, 2.0, 4), (0, 2.0, 4)])            # code absent
    _step(mon, trainer, 3, [(1, 9.0, 3)])                           # not a logging step
    _step(mon, trainer, 4, [(0, 1.0, 1), (1, 8.0, 4)])
    # Each write is the token mean over the interval's steps (1-2, then 3-4).
    assert writer.scalars["2_datasets/loss/web"] == [(2, 0.7), (4, 1.0)]
    assert writer.scalars["2_datasets/loss/code"] == [(2, 4.0), (4, 17.0 / 7.0)]
    # Tokens of every step (3 included) are counted, logged at logging steps.
    assert writer.scalars["2_datasets/tokens/web"] == [(2, 10.0), (4, 11.0)]
    assert writer.scalars["2_datasets/tokens/code"] == [(2, 1.0), (4, 8.0)]
    state = mon.state_dict()
    assert state == {"tokens": {"web": 11, "code": 8}}

    # Resume in a new process: counts continue; the last step (5) is always logged.
    trainer2, writer2 = _fake_trainer(steps=5)
    trainer2.state.step = 4
    resumed = DatasetLossMonitor(interval=2)
    resumed.load_state_dict(state)
    resumed.on_train_start(trainer2)
    _step(resumed, trainer2, 5, [(1, 1.0, 1)])
    assert writer2.scalars["2_datasets/tokens/web"] == [(5, 11.0)]
    assert writer2.scalars["2_datasets/tokens/code"] == [(5, 9.0)]
    assert writer2.scalars["2_datasets/loss/code"] == [(5, 1.0)]
    assert "2_datasets/loss/web" not in writer2.scalars
    assert resumed.state_dict() == {"tokens": {"web": 11, "code": 9}}


def test_burst_dataset_between_writes_is_logged():
    """A dataset whose samples come only on steps that are not written (a 5% burst
    dataset with min_share) still appears: the loss is accumulated over the interval."""
    trainer, writer = _fake_trainer(steps=6)
    mon = DatasetLossMonitor(interval=3)
    mon.on_train_start(trainer)
    _step(mon, trainer, 1, [(0, 2.0, 2)])
    _step(mon, trainer, 2, [(0, 1.0, 2), (1, 6.0, 2)])              # the burst: not written
    _step(mon, trainer, 3, [(0, 3.0, 2)])
    _step(mon, trainer, 4, [(0, 4.0, 2)])
    _step(mon, trainer, 5, [(1, 1.0, 1), (1, 2.0, 1)])              # the burst again
    _step(mon, trainer, 6, [(0, 2.0, 2)])
    assert writer.scalars["2_datasets/loss/code"] == [(3, 3.0), (6, 1.5)]
    assert writer.scalars["2_datasets/loss/web"] == [(3, 1.0), (6, 1.5)]
    assert writer.scalars["2_datasets/tokens/code"] == [(3, 2.0), (6, 4.0)]


# -- slow: real runs, event files, oracle ----------------------------------------------
def _scalars(run_dir: Path) -> dict[str, dict[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tb = tensorboard_dir(run_dir, "tiny")
    assert len(list(tb.glob("events.out.tfevents.*"))) == 1, "exactly one writer"
    acc = EventAccumulator(str(tb), size_guidance={"scalars": 0})
    acc.Reload()
    out = {}
    for tag in acc.Tags()["scalars"]:
        events = acc.Scalars(tag)
        assert len({e.step for e in events}) == len(events), f"{tag} written twice in a step"
        out[tag] = {e.step: e.value for e in events}
    return out


def _config(tiny_data, out, **checkpoint):
    from phoenix.testing.tiny import tiny_config_dict

    # "code" comes in bursts (min_share): in the batch of step 2 only, so steps 1 and 3
    # check that an absent dataset is not logged.
    datasets = [{"prefix": tiny_data.prefixes["web"], "weight": 0.8, "name": "web"},
                {"prefix": tiny_data.prefixes["code"], "weight": 0.2, "name": "code",
                 "min_share": 0.5}]
    return tiny_config_dict(tiny_data, out, train={"steps": STEPS},
                            data={"datasets": datasets},
                            logging={"tensorboard": True, "log_interval": 1},
                            checkpoint={"save_at_end": False, **checkpoint})


@pytest.fixture(scope="module")
def reference(tiny_data, tmp_path_factory):
    """One process; returns its event-file scalars and the oracle of every step.

    (A DP=2 run initialises the tiny model exactly like one process (same seed), so it
    needs no init_from checkpoint; if that ever changes, the DP test fails loudly.)"""
    from phoenix.testing.distributed import run_distributed
    from phoenix.testing.workers import train_with_dataset_monitors

    out = tmp_path_factory.mktemp("dsloss_ref")
    (result,) = run_distributed(train_with_dataset_monitors, 1,
                                _config(tiny_data, out), [], 1, True)
    return _scalars(out), result


def _close(a, b, rel):
    return math.isclose(a, b, rel_tol=rel, abs_tol=0.0)


def _check_against_oracle(scalars, oracle, rel):
    assert len(oracle) == STEPS
    cumulative = {n: 0.0 for n in NAMES}
    for step, per in enumerate(oracle, start=1):
        for name in NAMES:
            logged = scalars.get(f"2_datasets/loss/{name}", {})
            if name in per:
                loss_sum, tokens = per[name]
                cumulative[name] += tokens
                assert _close(logged[step], loss_sum / tokens, rel), (name, step, logged, per)
            else:
                assert step not in logged, f"{name} absent at step {step} but logged"
            assert scalars[f"2_datasets/tokens/{name}"][step] == cumulative[name], (name, step)
        # The token-weighted mean over datasets is the global 1_train/loss.
        step_tokens = {n: scalars[f"2_datasets/tokens/{n}"][step]
                       - scalars[f"2_datasets/tokens/{n}"].get(step - 1, 0.0) for n in NAMES}
        mean = (sum(scalars[f"2_datasets/loss/{n}"][step] * step_tokens[n]
                    for n in NAMES if step_tokens[n]) / sum(step_tokens.values()))
        assert _close(mean, scalars["1_train/loss"][step], 1e-5), (step, mean)
    return cumulative


@pytest.mark.slow
def test_single_process_matches_oracle(reference):
    scalars, result = reference
    oracle = result["oracle"]
    # The blend is what the test means: code in step 2's batch only, web in every batch.
    assert [sorted(per) for per in oracle] == [["web"], ["code", "web"], ["web"]]
    cumulative = _check_against_oracle(scalars, oracle, 1e-5)
    assert result["dataset_state"] == {"tokens": {n: int(v) for n, v in cumulative.items()}}
    assert sum(cumulative.values()) == scalars["1_train/consumed_tokens"][STEPS]
    # The throughput monitor ran in the same run: its tags, once per step, none clashing.
    for tag in ("tokens_per_sec_per_gpu", "forward_backward_time", "optimizer_time",
                "tflops_per_gpu"):
        assert sorted(scalars[f"3_throughput/{tag}"]) == [1, 2, 3], tag
    assert sorted(scalars["3_throughput/logging_time"]) == [2, 3]
    assert "3_throughput/mfu" not in scalars  # CPU, no configured peak


@pytest.mark.slow
def test_data_parallel_matches_oracle(reference, tiny_data, tmp_path):
    from phoenix.testing.distributed import run_distributed
    from phoenix.testing.workers import train_with_dataset_monitors

    ref_scalars, ref = reference
    results = run_distributed(train_with_dataset_monitors, 2,
                              _config(tiny_data, tmp_path), [], 1)
    assert results[0]["layout"].startswith("world=2 tp=1 pp=1 dp=2")
    scalars = _scalars(tmp_path)
    cumulative = _check_against_oracle(scalars, ref["oracle"], 1e-4)
    for r in results:  # state_dict() is collective and global on every rank
        assert r["dataset_state"] == {"tokens": {n: int(v) for n, v in cumulative.items()}}
    tags = sorted(t for t in scalars if t.startswith(("2_datasets/loss/", "2_datasets/tokens/")))
    assert tags == sorted(t for t in ref_scalars
                          if t.startswith(("2_datasets/loss/", "2_datasets/tokens/")))
