"""configs/recipes/moe_upcycle.yaml through examples/moe_upcycle.sh (tiny, CPU): a dense
model trains, ``phoenix upcycle`` turns it into a 4-expert MoE, and the MoE continues at
EP=2 from the upcycled weights with a fresh optimizer. The upcycling is exact (granularity
1, softmax after top-k), so the MoE starts at the dense model's loss, not at ln(vocab)."""

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
STEP = re.compile(r"step\s+(\d+)/(\d+) \| loss ([0-9.]+)")


def test_moe_upcycle_example_continues_from_the_dense_loss(tmp_path):
    run = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    proc = subprocess.run(["bash", "examples/moe_upcycle.sh", sys.executable, str(run)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=600)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]

    losses = {}
    for step, total, loss in STEP.findall(log):
        losses.setdefault(int(total), []).append(float(loss))
    dense, moe = losses[30], losses[20]
    info = json.loads((run / "upcycled" / "upcycle.json").read_text())
    assert info["exact"] and info["granularity"] == 1 and info["num_experts"] == 4
    assert "world=2 tp=1 pp=1 dp=2 ep=2" in log
    assert "initialised weights (the optimizer starts fresh) from" in log
    print(f"dense: {dense[0]:.4f} -> {dense[-1]:.4f}; MoE after upcycling: {moe[0]:.4f} -> "
          f"{moe[-1]:.4f} (ln V = {math.log(1024):.4f})")
    assert dense[-1] < dense[0] - 1.0  # the dense model learned something to keep
    assert abs(moe[0] - dense[-1]) < 0.3, (dense[-1], moe[0])
    assert moe[0] < math.log(1024) - 1.5
    assert moe[-1] < moe[0] - 0.2  # and the MoE trains on
    assert (run / "moe" / "checkpoints" / "latest").read_text().strip() == "step_000020"
