"""``make install`` says what it installs before each quiet pip step (issue 23: it was
silent for minutes). ``make -n`` prints the recipe without running it."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_every_install_step_is_announced(tmp_path):
    out = subprocess.run(["make", "-n", "install", f"VENV={tmp_path / 'venv'}"], cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout.splitlines()
    steps = [i for i, line in enumerate(out) if " -m venv " in line or "pip install" in line]
    assert len(steps) == 5
    for i in steps:
        assert out[i - 1].startswith('echo "== ['), (out[i - 1], out[i])
    assert "torch==" in out[steps[2] - 1] and "megatron-core==" in out[steps[3] - 1]
