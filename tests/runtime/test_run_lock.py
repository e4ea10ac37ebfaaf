"""The run lock and the start-up agreement, on real processes but without training.

(The training jobs that use them are in test_run_safety.py and test_multinode.py.)
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

import pytest

from phoenix.runtime.run_lock import LOCK_NAME, RunLock, RunLockError, pid_alive
from phoenix.testing.processes import REPO, alive, wait_until

ENV = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")


def dead_pid() -> int:
    """The pid of a process of this host that has exited (and been reaped)."""
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def forge_lock(run_dir, **fields) -> dict:
    """Write a lock file as another job would have left it (this machine unless told)."""
    record = RunLock(run_dir).record | {"token": "theirs"} | fields
    (run_dir / "forged").write_text(json.dumps(record))
    os.replace(run_dir / "forged", run_dir / LOCK_NAME)  # atomically, as a real job would
    return record


def test_lock_is_exclusive_across_processes_and_names_the_holder(tmp_path):
    lock = RunLock(tmp_path).acquire()
    try:
        holder = json.loads((tmp_path / LOCK_NAME).read_text())
        assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
        other = subprocess.run(
            [sys.executable, "-c", "import sys; from phoenix.runtime import RunLock\n"
             "try: RunLock(sys.argv[1]).acquire()\nexcept Exception as e: print(e); sys.exit(2)",
             str(tmp_path)], env=ENV, capture_output=True, text=True, timeout=120)
        assert other.returncode == 2, other.stderr
        assert f"host {socket.gethostname()}, pid {os.getpid()}" in other.stdout
        assert "is in use by another job" in other.stdout
    finally:
        lock.release()
    assert not (tmp_path / LOCK_NAME).exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no temporary files left
    RunLock(tmp_path).acquire().release()  # free again


def test_stale_lock_of_a_dead_pid_on_this_host_is_taken_over(tmp_path, caplog):
    pid = dead_pid()
    forge_lock(tmp_path, pid=pid, process_start="")
    with caplog.at_level(logging.WARNING, logger="phoenix.runtime.run_lock"):
        lock = RunLock(tmp_path).acquire()
    assert json.loads((tmp_path / LOCK_NAME).read_text())["token"] == lock.token
    assert f"taking over the stale lock {tmp_path / LOCK_NAME} of host {socket.gethostname()} pid {pid}" \
        in caplog.text and "is gone" in caplog.text
    lock.release()
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_live_holder_on_this_host_is_kept_however_old_its_heartbeat(tmp_path):
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        forge_lock(tmp_path, pid=sleeper.pid, process_start="", heartbeat=time.time() - 10_000)
        with pytest.raises(RunLockError, match=f"pid {sleeper.pid}"):
            RunLock(tmp_path, stale_after=1).acquire()
    finally:
        sleeper.kill()
        sleeper.wait()
    assert not pid_alive(sleeper.pid)
    RunLock(tmp_path).acquire().release()  # now it is stale


def test_reused_pid_is_not_the_holder(tmp_path):
    # our own parent is alive, but started at another time than the lock says
    forge_lock(tmp_path, pid=os.getppid(), process_start="1")
    RunLock(tmp_path).acquire().release()


def test_holder_on_another_machine_is_stale_only_after_the_heartbeat_timeout(tmp_path):
    forge_lock(tmp_path, host="node-b", machine="other", pid=os.getpid(), heartbeat=time.time() - 5)
    with pytest.raises(RunLockError, match="host node-b, pid"):
        RunLock(tmp_path, stale_after=60).acquire()
    RunLock(tmp_path, stale_after=1).acquire().release()


def test_lock_of_an_earlier_attempt_of_the_same_torchrun_job_is_stale(tmp_path, monkeypatch):
    # torchrun restarted the job (TORCHELASTIC_RESTART_COUNT 1) and rank 0 moved to another node
    forge_lock(tmp_path, host="node-b", machine="other", pid=4242, torchrun_run_id="job7",
               torchrun_restart=0)
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job7")
    with pytest.raises(RunLockError, match="host node-b, pid 4242"):
        RunLock(tmp_path).acquire()  # restart 0 too: not an earlier attempt
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    RunLock(tmp_path).acquire().release()
    forge_lock(tmp_path, host="node-b", machine="other", pid=4242, torchrun_run_id="job8")
    with pytest.raises(RunLockError, match="host node-b, pid 4242"):
        RunLock(tmp_path).acquire()  # another job


def test_heartbeat_is_refreshed_and_a_lost_lock_stops_the_holder(tmp_path):
    script = textwrap.dedent("""
        import sys, time
        from phoenix.runtime import RunLock
        lock = RunLock(sys.argv[1], heartbeat_interval=0.2).acquire()
        print("held", flush=True)
        time.sleep(60)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script, str(tmp_path)], env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "held"
        first = json.loads((tmp_path / LOCK_NAME).read_text())["heartbeat"]
        assert wait_until(lambda: json.loads((tmp_path / LOCK_NAME).read_text())["heartbeat"] > first, 10)
        # Another job takes the directory over (as after a heartbeat timeout): the holder stops.
        forge_lock(tmp_path, host="node-b", machine="other", pid=4242)
        assert proc.wait(timeout=30) == 2
        assert "was taken over by host node-b pid 4242" in proc.stderr.read()
    finally:
        proc.kill()
        proc.wait()


# -- the torchrun agent's death --------------------------------------------------------------

AGENT = textwrap.dedent("""
    # A stand-in for torchrun's agent: starts one worker in a session of its own (as the
    # elastic agent does), prints its pid, and waits.
    import os, subprocess, sys, time
    worker = subprocess.Popen([sys.executable, "-c", sys.argv[1]], start_new_session=True,
                              env=dict(os.environ, TORCHELASTIC_RUN_ID="test"))
    print(worker.pid, flush=True)
    time.sleep(120)
""")

WORKER = textwrap.dedent("""
    import sys, time
    from phoenix.runtime import watchdog
    if {no_prctl}:
        watchdog.set_parent_death_signal = lambda sig: False
    assert watchdog.exit_with_parent(interval=0.2)
    print("armed", file=sys.stderr, flush=True)
    time.sleep(120)
""")


@pytest.mark.parametrize("no_prctl", [False, True], ids=["pdeathsig", "watchdog_thread"])
def test_worker_exits_when_its_agent_is_killed(tmp_path, no_prctl):
    log = tmp_path / "agent.log"
    with open(log, "w") as out:
        agent = subprocess.Popen([sys.executable, "-c", AGENT, WORKER.format(no_prctl=no_prctl)],
                                 env=ENV, stdout=subprocess.PIPE, stderr=out, text=True,
                                 start_new_session=True)
    worker = None
    try:
        worker = int(agent.stdout.readline())
        assert wait_until(lambda: "armed" in log.read_text(), 120), log.read_text()
        assert os.getpgid(worker) != agent.pid  # killing the agent's group would spare it
        os.killpg(agent.pid, signal.SIGKILL)
        agent.wait()
        assert wait_until(lambda: not alive(worker), 10), "the worker outlived its agent"
        if no_prctl:
            assert f"the torchrun agent (pid {agent.pid}) that started this worker has exited" \
                in log.read_text()
    finally:
        for pid in (agent.pid, worker):
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, TypeError):
                pass
        agent.wait()


def test_worker_whose_agent_died_during_its_start_up_exits(tmp_path):
    # The agent exits before the worker arms the watchdog: the worker has been re-parented
    # to init by then (where pid 1 is a launcher, e.g. torchrun in a container, it cannot tell).
    with open("/proc/1/cmdline", "rb") as f:
        if b"torch" in f.read() or os.getpid() == 1:
            pytest.skip("pid 1 is a launcher here")
    late = "import sys, time\ntime.sleep(1)\n" + WORKER.format(no_prctl=False)
    short_lived_agent = AGENT.replace("time.sleep(120)", "")
    log = tmp_path / "agent.log"
    with open(log, "w") as out:
        agent = subprocess.run([sys.executable, "-c", short_lived_agent, late], env=ENV,
                               stdout=subprocess.PIPE, stderr=out, text=True, timeout=60)
    worker = int(agent.stdout.split()[0])
    try:
        assert wait_until(lambda: not alive(worker), 120), log.read_text()
        assert "that started this worker has exited" in log.read_text()
        assert "armed" not in log.read_text()
    finally:
        try:
            os.kill(worker, signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_plain_python_has_no_watchdog():
    out = subprocess.run([sys.executable, "-c", "from phoenix.runtime import watchdog; "
                          "print(watchdog.exit_with_parent())"],
                         env={k: v for k, v in ENV.items() if not k.startswith("TORCHELASTIC_")},
                         capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "False", out.stderr


# -- every rank agrees (2 gloo ranks) ---------------------------------------------------------

@pytest.mark.slow
def test_an_error_on_one_rank_is_raised_on_every_rank(tmp_path):
    from phoenix.testing.distributed import run_distributed
    from phoenix.testing.processes import fail_on_rank, views_of_rank_dirs

    results = run_distributed(fail_on_rank, 2, 1, "tokenizer.model: cannot load /x/tok.model")
    assert results[1] == "ConfigError: tokenizer.model: cannot load /x/tok.model"
    assert results[0] == (f"ConfigError: tokenizer.model: cannot load /x/tok.model "
                          f"(on 1 of 2 ranks: rank 1 on host {socket.gethostname()})")

    shared = run_distributed(views_of_rank_dirs, 2, str(tmp_path / "a"), True)
    assert shared[0] == shared[1] == [(0, str(tmp_path / "a" / "cache"), True),
                                      (1, str(tmp_path / "a" / "cache"), True)]
    private = run_distributed(views_of_rank_dirs, 2, str(tmp_path / "b"), False)
    assert private[0] == [(0, str(tmp_path / "b" / "rank0" / "cache"), True),
                          (1, str(tmp_path / "b" / "rank1" / "cache"), False)]
    assert list((tmp_path / "a" / "cache").iterdir()) == []  # the token file is removed
