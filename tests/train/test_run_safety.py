"""One job per run directory, and no orphans: real training jobs on one output_dir.

* a second job on a directory that a live job holds is refused (exit 2, one line naming
  the holder's host and pid) and the first one finishes unharmed;
* the lock of a job that died (dead pid on this host) is taken over by the next one;
* SIGKILL on torchrun's agent takes its workers with it (they run in sessions of their
  own, so before the fix they trained on and raced any restart), and the helper processes
  the workers started for their checkpoints.
"""

import json
import os
import signal
import socket
import textwrap

import pytest
import yaml

from phoenix.runtime.run_lock import LOCK_NAME, RunLock
from phoenix.testing.processes import alive, kill_tree, start, torchrun_args, wait_until
from phoenix.testing.tiny import tiny_config_dict

pytestmark = pytest.mark.slow

# `python -m phoenix.train` whose Trainer.train waits for a gate file: it holds the run
# lock (taken in setup) for as long as the test needs.
GATED = textwrap.dedent("""
    import os, sys, time
    from phoenix.train import trainer as trainer_mod
    real_train = trainer_mod.Trainer.train

    def gated(self):
        gate = os.environ["PHOENIX_TEST_GATE"]
        open(gate + ".waiting", "w").close()
        while not os.path.exists(gate):
            time.sleep(0.2)
        return real_train(self)

    if __name__ == "__main__":
        trainer_mod.Trainer.train = gated
        from phoenix.train.run import main
        sys.exit(main(sys.argv[1:]))
""")


def write_config(tmp_path, tiny_data, **sections):
    cfg = tiny_config_dict(tiny_data, tmp_path / "run", **sections)
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_second_job_is_refused_while_the_first_holds_the_run_dir(tiny_data, tmp_path, monkeypatch):
    cfg = write_config(tmp_path, tiny_data, train={"steps": 3},
                       checkpoint={"save_interval": 1, "save_at_end": True})
    script = tmp_path / "gated_train.py"
    script.write_text(GATED)
    gate = tmp_path / "gate"
    monkeypatch.setenv("PHOENIX_TEST_GATE", str(gate))
    first = start([script, cfg], tmp_path / "first.log")
    try:
        assert wait_until(lambda: (tmp_path / "gate.waiting").exists() or first.poll() is not None,
                          300), (tmp_path / "first.log").read_text()
        assert first.poll() is None, (tmp_path / "first.log").read_text()
        holder = json.loads((tmp_path / "run" / LOCK_NAME).read_text())
        assert holder["pid"] == first.pid

        second = start(["-m", "phoenix.train", cfg, "train.seed=99"], tmp_path / "second.log")
        assert second.wait(timeout=300) == 2
        output = (tmp_path / "second.log").read_text()
        assert f"is in use by another job: host {socket.gethostname()}, pid {first.pid}" in output
        assert "Traceback" not in output
        assert [line for line in output.splitlines() if line.startswith("phoenix:")] == \
            [line for line in output.splitlines() if "in use by another job" in line]

        gate.touch()
        assert first.wait(timeout=300) == 0, (tmp_path / "first.log").read_text()
    finally:
        kill_tree(first)
    run = tmp_path / "run"
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_000003"
    assert yaml.safe_load((run / "config.yaml").read_text())["train"]["seed"] == 1234  # the first's
    assert not (run / LOCK_NAME).exists()  # released at the end


def test_lock_of_a_dead_job_is_taken_over(tiny_data, tmp_path):
    cfg = write_config(tmp_path, tiny_data, train={"steps": 3})
    (tmp_path / "run").mkdir()
    dead = start(["-c", "pass"], tmp_path / "dead.log")
    dead.wait()
    record = RunLock(tmp_path / "run").record | {"pid": dead.pid, "process_start": "",
                                                 "token": "a dead job's"}
    (tmp_path / "run" / LOCK_NAME).write_text(json.dumps(record))

    job = start(["-m", "phoenix.train", cfg], tmp_path / "job.log")
    assert job.wait(timeout=300) == 0, (tmp_path / "job.log").read_text()
    output = (tmp_path / "job.log").read_text()
    assert (f"taking over the stale lock {tmp_path / 'run' / LOCK_NAME} of host "
            f"{socket.gethostname()} pid {dead.pid} (pid {dead.pid} is gone)") in output
    assert "step      3/3" in output
    assert not (tmp_path / "run" / LOCK_NAME).exists()


def test_no_process_of_the_job_outlives_a_sigkilled_torchrun_agent(tiny_data, tmp_path):
    """After a checkpoint, a worker has helpers of its own (megatron's write-results
    Manager and the resource_tracker it keeps alive); SIGKILL of torchrun's process group
    ends the workers and every helper (they were re-parented to init and lived on)."""
    import psutil

    # Long enough that the workers are still training when the agent is killed.
    cfg = write_config(tmp_path, tiny_data, train={"steps": 2000},
                       checkpoint={"save_interval": 2, "save_at_end": False})
    log = tmp_path / "torchrun.log"
    agent = start([*torchrun_args(2), "-m", "phoenix.train", cfg], log)
    lock = tmp_path / "run" / LOCK_NAME
    latest = tmp_path / "run" / "checkpoints" / "latest"
    workers, job = [], []
    try:
        assert wait_until(lambda: latest.exists() or agent.poll() is not None, 300), log.read_text()
        assert agent.poll() is None, log.read_text()
        workers = [p.pid for p in psutil.Process(agent.pid).children()]
        assert len(workers) == 2, workers
        job = [p.pid for p in psutil.Process(agent.pid).children(recursive=True)]
        assert len(job) > len(workers), job  # the save started helpers
        assert json.loads(lock.read_text())["pid"] in workers  # rank 0 holds the lock
        # The fault: workers are in sessions of their own, so SIGKILL on the agent's whole
        # process group reaches the agent only.
        assert all(os.getpgid(pid) != agent.pid for pid in workers)
        os.killpg(agent.pid, signal.SIGKILL)
        agent.wait(timeout=30)
        assert wait_until(lambda: not any(alive(pid) for pid in job), 15), \
            (f"outlived their agent: {[psutil.Process(p).cmdline() for p in job if alive(p)]}\n"
             f"{log.read_text()[-3000:]}")
        holder = json.loads(lock.read_text())
        assert not alive(holder["pid"])  # a stale lock: a restart on this host takes it over
    finally:
        kill_tree(agent, extra_pids=job)
