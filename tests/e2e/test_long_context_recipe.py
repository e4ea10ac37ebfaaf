"""configs/recipes/long_context.yaml through examples/long_context.sh (torchrun, 2 ranks,
tiny sizes): the RoPE base switches at the stage boundary, eval follows each stage's
length, the needle eval logs to TensorBoard (read back with its own reader) and writes
its heatmap."""

import json
import os
import subprocess
from pathlib import Path

import pytest
import yaml

from phoenix.monitor.tensorboard import tensorboard_dir

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]


def test_long_context_example_runs_both_stages(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    proc = subprocess.run(["bash", "examples/long_context.sh", str(ROOT / ".venv/bin/python"),
                           f"output_dir={out}"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=900)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    assert "stage 'extend_32k': RoPE rope(base=10000) -> rope(base=1e+06)" in log
    assert "stage 2/2 'extend_32k' begins at step 20: global batch 8 x seq 256" in log

    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["stages"][1]["rope"]["base"] == 1e6 and saved["data"]["document_mask"]
    assert (out / "checkpoints" / "latest").read_text().strip().endswith("step_000030")
    assert (out / "needle" / "step_0000030.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    acc = EventAccumulator(str(tensorboard_dir(out, "long_context")),
                           size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    for tag in ("eval/web_val/loss", "eval/needle/128", "eval/needle/256", "eval/needle/mean"):
        assert [e.step for e in acc.Scalars(tag)] == [10, 20, 30], tag
    for tag in ("eval/needle/128", "eval/needle/256"):
        assert all(0.0 <= e.value <= 1.0 for e in acc.Scalars(tag))
    assert [e.step for e in acc.Images("eval/needle/heatmap")] == [10, 20, 30]
    losses = [e.value for e in acc.Scalars("1_train/loss")]
    assert len(losses) >= 6 and losses[-1] < losses[0] - 1.0

    # `phoenix eval` on the final checkpoint reproduces the in-training eval of step 30:
    # it must use the last stage's RoPE (base 1M) and sequence length (256).
    report = out / "eval.json"
    proc = subprocess.run([str(ROOT / ".venv/bin/python"), "-m", "phoenix.cli", "eval",
                           str(out), str(out / "config.yaml"), "--out", str(report)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    standalone = json.loads(report.read_text())["sets"]["web_val"]
    in_training = acc.Scalars("eval/web_val/loss")[-1].value
    assert standalone["tokens"] == 16 * 256
    assert abs(standalone["loss"] - in_training) <= 1e-5 * abs(in_training)
