"""A command whose output is piped into a reader that stops early (`phoenix inspect-batch
RUN 16 | head -2`) ends quietly: no BrokenPipeError traceback, exit status 0."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BODY = ("import sys; from phoenix.runtime.command import run_command; "
        "sys.exit(run_command(lambda: [print('sample', i) for i in range(200000)] and None))")


def test_a_closed_pipe_ends_the_command_quietly():
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run(["bash", "-c", f'set -o pipefail; "{sys.executable}" -c "{BODY}" | head -2'],
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.stdout.splitlines() == ["sample 0", "sample 1"]
    assert proc.stderr == "" and proc.returncode == 0, proc.stderr
