"""A SIGKILL in the middle of writing a checkpoint leaves the previous one as latest."""

import os
import signal
import subprocess
import sys
import textwrap

import pytest
import yaml

from phoenix.checkpoint import find_latest
from phoenix.testing.distributed import run_distributed
from phoenix.testing.tiny import tiny_config_dict
from phoenix.testing.workers import train_and_record

pytestmark = pytest.mark.slow

# Runs training in a fresh interpreter and kills itself (SIGKILL, no cleanup) once the
# step-4 save has written part of its shards.
KILLER = textwrap.dedent("""
    import os, signal, sys, yaml
    from phoenix.checkpoint.sharded_save import ShardedSave
    real_write = ShardedSave.write

    def write_then_die(self, ckpt_dir, **kwargs):
        result = real_write(self, ckpt_dir, **kwargs)
        if "step_000004" in str(ckpt_dir):
            assert os.listdir(ckpt_dir), "expected shards on disk before the kill"
            os.kill(os.getpid(), signal.SIGKILL)
        return result

    if __name__ == "__main__":  # megatron's checkpoint writer spawns helper processes
        ShardedSave.write = write_then_die
        from phoenix.testing.workers import train_and_record
        train_and_record(yaml.safe_load(open(sys.argv[1])))
""")


def test_sigkill_during_save_keeps_previous_latest(tiny_data, tmp_path):
    cfg = tiny_config_dict(tiny_data, tmp_path / "run", train={"steps": 6},
                           checkpoint={"save_interval": 2, "save_at_end": True})
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.getcwd())
    script = tmp_path / "kill_during_save.py"
    script.write_text(KILLER)
    log = tmp_path / "killed.log"
    # Own session and a log file rather than pipes: megatron's checkpoint writer leaves a
    # helper process behind when its parent is SIGKILLed, and it would hold a pipe open.
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, str(script), str(tmp_path / "cfg.yaml")],
                                env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            returncode = proc.wait(timeout=300)
        finally:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    assert returncode == -signal.SIGKILL, log.read_text()[-3000:]

    ckpts = tmp_path / "run" / "checkpoints"
    assert (ckpts / ".tmp-step_000004").is_dir()  # the half-written save is still there...
    assert find_latest(ckpts).name == "step_000002"  # ...but is not taken as latest
    assert (ckpts / "latest").read_text().strip() == "step_000002"

    (resumed,) = run_distributed(train_and_record, 1, cfg)
    assert [s["step"] for s in resumed["steps"]] == [3, 4, 5, 6]
    assert find_latest(ckpts).name == "step_000006"
    assert not (ckpts / ".tmp-step_000004").exists()  # swept when the next job started
