"""checkpoint.optimizer_format: the default dp_reshardable state resumes at another
data-parallel size; at another TP it is refused in one line naming ``phoenix reshard``,
which rewrites it as fully_reshardable, after which the run resumes at the new layout."""

import os
import shutil
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from phoenix.checkpoint.optimizer_format import layout_problem
from phoenix.checkpoint.reshard import reshard_world_size
from phoenix.testing.distributed import run_distributed
from phoenix.testing.tiny import tiny_config_dict
from phoenix.testing.workers import train_and_record


def _parallel(**degrees):
    return SimpleNamespace(**{"tensor": 1, "pipeline": 1, "context": 1, "expert": 1,
                              "expert_tensor": None, **degrees})


def test_the_layout_record_decides_what_loads_where(tmp_path):
    saved = {"optimizer_format": "dp_reshardable", "has_optimizer": True,
             "optimizer_layout": {"degrees": {"tensor": 2, "pipeline": 1, "context": 1,
                                              "expert": 1, "expert_tensor": 2}, "buckets": []}}
    path = tmp_path / "run" / "checkpoints" / "step_000004"
    assert layout_problem(saved, path, _parallel(tensor=2)) is None  # any DP: not in the record
    line = layout_problem(saved, path, _parallel())
    assert "\n" not in line and "parallel tensor=2 pipeline=1" in line
    assert f"`phoenix reshard {tmp_path / 'run'} --out {tmp_path / 'run'}`" in line
    older = {"format": 3, "has_optimizer": True}  # written before the format was recorded
    assert layout_problem(older, path, _parallel(tensor=4)) is None
    assert reshard_world_size(_parallel(tensor=2, pipeline=2)) == 4
    assert reshard_world_size(_parallel(tensor=2, expert=4, expert_tensor=1)) == 4


def _run(tiny_data, path, **checkpoint):
    return tiny_config_dict(tiny_data, path, train={"steps": 4},
                            checkpoint={"save_interval": 2, "save_at_end": False, **checkpoint})


def _resume_from(src_run, dst_run, step="step_000002"):
    (dst_run / "checkpoints").mkdir(parents=True)
    shutil.copytree(src_run / "checkpoints" / step, dst_run / "checkpoints" / step)


@pytest.mark.slow
def test_dp_reshardable_resumes_at_another_data_parallel_size(tiny_data, tmp_path):
    reference = run_distributed(train_and_record, 2, _run(tiny_data, tmp_path / "dp2"))[0]
    _resume_from(tmp_path / "dp2", tmp_path / "dp1")
    (resumed,) = run_distributed(train_and_record, 1, _run(tiny_data, tmp_path / "dp1"))
    assert [s["step"] for s in resumed["steps"]] == [3, 4]
    for a, b in zip(reference["steps"][2:], resumed["steps"]):
        assert abs(a["loss"] - b["loss"]) <= 1e-5 * abs(a["loss"]), (a, b)


@pytest.mark.slow
def test_another_tp_is_refused_then_resumes_after_phoenix_reshard(tiny_data, tmp_path):
    reference = run_distributed(train_and_record, 2, _run(tiny_data, tmp_path / "tp2"),
                                ["parallel.tensor=2"])[0]
    run = tmp_path / "tp1"
    _resume_from(tmp_path / "tp2", run)
    cfg = _run(tiny_data, run)
    with pytest.raises(RuntimeError) as refused:
        run_distributed(train_and_record, 1, cfg)
    line = next(x for x in str(refused.value).splitlines() if "CheckpointError: " in x)
    assert "dp_reshardable" in line and f"`phoenix reshard {run} --out {run}`" in line, line

    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-m", "phoenix.cli", "reshard", str(run), "--out", str(run)],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "fully_reshardable" in done.stdout
    state = torch.load(run / "checkpoints" / "step_000002" / "phoenix_state.pt", weights_only=False)
    assert state["optimizer_format"] == "fully_reshardable" and state["step"] == 2

    (resumed,) = run_distributed(train_and_record, 1, cfg)
    assert [s["step"] for s in resumed["steps"]] == [3, 4]
    for a, b in zip(reference["steps"][2:], resumed["steps"]):
        assert abs(a["loss"] - b["loss"]) <= 1e-4 * abs(a["loss"]), (a, b)
    converted = run / "checkpoints" / "step_000002"
    again = subprocess.run([sys.executable, "-m", "phoenix.cli", "reshard", str(converted), "--out", str(run)],
                           capture_output=True, text=True, env=env, timeout=120)
    assert again.returncode == 2 and "needs no resharding" in again.stderr
    assert len(again.stderr.strip().splitlines()) == 1, again.stderr
