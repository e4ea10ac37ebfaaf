"""Preemption, Ctrl-C and time limits: SIGTERM / SIGUSR1 (on any one rank), SIGINT (Ctrl-C
in the launcher's terminal) or the time limit make every rank finish the step, save and
exit 0; the resumed run is bit-identical to an uninterrupted one. A second signal exits
at once."""

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
import yaml

from phoenix.checkpoint import find_latest
from phoenix.testing.checkpoints import read_checkpoint_tensors
from phoenix.testing.distributed import run_distributed
from phoenix.runtime.ports import free_port
from phoenix.testing.processes import start, torchrun_args
from phoenix.testing.tiny import tiny_config_dict
from phoenix.testing.workers import train_and_record

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
STEPS = 12


def _recipe(tiny_data, run_dir: Path) -> Path:
    cfg = tiny_config_dict(tiny_data, run_dir, train={"steps": STEPS},
                           logging={"log_interval": 1, "tensorboard": False},
                           checkpoint={"save_at_end": True})
    path = run_dir.parent / f"{run_dir.name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _torchrun(recipe: Path, *extra: str) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1")
    return subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
         "--master-addr", "127.0.0.1", "--master-port", str(free_port()), "-m", "phoenix.train",
         str(recipe), *extra],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _worker_of_rank(proc: subprocess.Popen, rank: int) -> psutil.Process:
    for child in psutil.Process(proc.pid).children(recursive=True):
        try:
            if child.environ().get("RANK") == str(rank):
                return child
        except psutil.Error:
            continue
    raise AssertionError(f"no worker with RANK={rank}")


def _read_until(proc: subprocess.Popen, pattern: str, lines: list[str]) -> None:
    for line in proc.stdout:
        lines.append(line)
        if re.search(pattern, line):
            return
    raise AssertionError("".join(lines))


def test_signal_on_one_rank_saves_and_resume_is_bit_identical(tiny_data, tmp_path):
    reference = _torchrun(_recipe(tiny_data, tmp_path / "ref"))
    out, _ = reference.communicate(timeout=900)
    assert reference.returncode == 0, out

    recipe = _recipe(tiny_data, tmp_path / "pre")
    proc, lines = _torchrun(recipe), []
    _read_until(proc, r"step +3/", lines)
    _worker_of_rank(proc, 1).send_signal(signal.SIGUSR1)  # only one rank is told
    out = "".join(lines) + proc.communicate(timeout=900)[0]
    assert proc.returncode == 0, out
    stopped = re.search(r"stopping after step (\d+): another rank was asked to stop|"
                        r"stopping after step (\d+): SIGUSR1 received", out)
    assert stopped, out
    step = int(stopped.group(1) or stopped.group(2))
    assert 3 <= step < STEPS
    assert find_latest(tmp_path / "pre" / "checkpoints").name == f"step_{step:06d}"

    resumed = _torchrun(recipe)
    out, _ = resumed.communicate(timeout=900)
    assert resumed.returncode == 0, out
    assert "resumed from" in out and f"at step {step}" in out
    a = read_checkpoint_tensors(find_latest(tmp_path / "ref" / "checkpoints"))
    b = read_checkpoint_tensors(find_latest(tmp_path / "pre" / "checkpoints"))
    assert find_latest(tmp_path / "pre" / "checkpoints").name == f"step_{STEPS:06d}"
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, different


def test_second_signal_exits_at_once(tiny_data, tmp_path):
    recipe = _recipe(tiny_data, tmp_path / "twice")
    proc, lines = _torchrun(recipe, "train.steps=200", "checkpoint.save_interval=0",
                            "checkpoint.save_at_end=false"), []
    _read_until(proc, r"step +2/", lines)
    worker = _worker_of_rank(proc, 0)
    worker.send_signal(signal.SIGTERM)
    time.sleep(0.05)
    worker.send_signal(signal.SIGTERM)
    out = "".join(lines) + proc.communicate(timeout=300)[0]
    assert proc.returncode != 0, out
    assert "SIGTERM received again: exiting without saving" in out, out


def test_time_limit_stops_cleanly(tiny_data, tmp_path):
    cfg = tiny_config_dict(tiny_data, tmp_path / "limit", train={"steps": STEPS,
                                                                   "time_limit_minutes": 1e-6})
    (result,) = run_distributed(train_and_record, 1, cfg)
    assert result["step"] == 1  # the limit has passed after the first step
    assert find_latest(tmp_path / "limit" / "checkpoints").name == "step_000001"


def test_ctrl_c_saves_and_exits_0(tiny_data, tmp_path):
    """Ctrl-C in the terminal of ``phoenix torchrun`` (SIGINT to its process group; the
    workers are in sessions of their own): every rank finishes its step and saves, the job
    exits 0 with one line naming the checkpoint that resumes it, and no traceback. The
    run's files have the user's umask."""
    recipe = _recipe(tiny_data, tmp_path / "ctrl_c")
    log = tmp_path / "ctrl_c.log"
    old = os.umask(0o027)
    try:
        launcher = start(["-m", "phoenix.cli", "torchrun", *torchrun_args(2)[2:], "-m",
                          "phoenix.train", recipe, "train.steps=200", "checkpoint.save_interval=0"],
                         log)
    finally:
        os.umask(old)
    try:
        deadline = time.monotonic() + 300
        while not re.search(r"step +3/", log.read_text()) and launcher.poll() is None:
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        os.killpg(launcher.pid, signal.SIGINT)  # what the terminal does on Ctrl-C
        assert launcher.wait(timeout=300) == 0, log.read_text()
    finally:
        if launcher.poll() is None:
            os.killpg(launcher.pid, signal.SIGKILL)
    out = log.read_text()
    assert "Traceback" not in out and "KeyboardInterrupt" not in out, out
    stopped = re.findall(r"stopping after step (\d+): SIGINT received; checkpoint (\S+) resumes "
                         r"the run", out)
    assert len(stopped) == 1, out
    step, path = int(stopped[0][0]), Path(stopped[0][1])
    assert 3 <= step < 200 and path == tmp_path / "ctrl_c" / "checkpoints" / f"step_{step:06d}"
    assert find_latest(tmp_path / "ctrl_c" / "checkpoints") == path
    for f in (tmp_path / "ctrl_c" / "config.yaml", path.parent / "latest", path / "phoenix_state.pt"):
        assert f.stat().st_mode & 0o777 == 0o640, f
