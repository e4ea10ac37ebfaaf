"""phoenix.io: atomic publication, and the sweep of builds killed before publishing."""

import os
import socket
import subprocess
import sys
import time

import numpy as np

from phoenix.io import STALE_DIR_SECONDS, publish_dir, sweep_stale_dirs


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_build_killed_mid_way_is_swept_by_the_next_publish(tmp_path):
    """A cache build killed with -9 leaves its temporary directory; the next publish in
    that cache removes it, and leaves running builds (here or on other hosts) alone."""
    host = socket.gethostname()
    killed = tmp_path / f".samples-web-0123.{host}.{_dead_pid()}.abc_1.tmp"
    running = tmp_path / f".samples-web-0123.{host}.{os.getpid()}.abc_2.tmp"
    other_new = tmp_path / ".plan-77.other-node.12.abc_3.tmp"
    other_old = tmp_path / ".plan-77.other-node.13.abc_4.tmp"
    unrelated = tmp_path / ".notes.tmp"
    for d in (killed, running, other_new, other_old, unrelated):
        d.mkdir()
        (d / "starts.npy").write_bytes(b"partial")
    old = time.time() - STALE_DIR_SECONDS - 60
    os.utime(other_old, (old, old))

    assert publish_dir(tmp_path / "plan-1", lambda d: np.save(d / "x.npy", np.arange(3)))
    assert not killed.exists() and not other_old.exists()
    assert running.exists() and other_new.exists() and unrelated.exists()
    assert np.load(tmp_path / "plan-1" / "x.npy").tolist() == [0, 1, 2]
    assert sweep_stale_dirs(tmp_path) == []  # nothing more to do
    # publish_dir's own temporary directory names its host and pid (what the sweep reads)
    seen = []
    publish_dir(tmp_path / "plan-2", lambda d: seen.append(d.name))
    assert f".plan-2.{host}.{os.getpid()}." in seen[0]


def test_a_real_kill_9_leaves_nothing_after_the_next_publish(tmp_path):
    code = ("import sys, time; from pathlib import Path; from phoenix.io import publish_dir\n"
            "def write(d):\n"
            "    (d / 'a.npy').write_bytes(b'x'); print('writing', flush=True); time.sleep(60)\n"
            f"publish_dir(Path({str(tmp_path)!r}) / 'samples-x', write)\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": os.getcwd()})
    assert proc.stdout.readline().strip() == "writing"
    proc.kill()
    proc.wait()
    assert len(list(tmp_path.glob(".samples-x.*.tmp"))) == 1
    publish_dir(tmp_path / "samples-y", lambda d: (d / "b.npy").write_bytes(b"y"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["samples-y"]


def test_published_files_follow_the_umask(tmp_path):
    """Run files (config.yaml, checkpoints/latest, reports, caches) get the user's umask, so
    a team sharing a file system can read them (mkstemp/mkdtemp made them 0600/0700)."""
    from phoenix.io import atomic_write_text

    for umask, file_mode, dir_mode in ((0o022, 0o644, 0o755), (0o002, 0o664, 0o775),
                                       (0o077, 0o600, 0o700)):
        old = os.umask(umask)
        try:
            atomic_write_text(tmp_path / f"config-{umask:o}.yaml", "a: 1\n")
            publish_dir(tmp_path / f"cache-{umask:o}", lambda d: (d / "x.npy").write_bytes(b"x"))
        finally:
            os.umask(old)
        assert (tmp_path / f"config-{umask:o}.yaml").stat().st_mode & 0o777 == file_mode
        assert (tmp_path / f"cache-{umask:o}").stat().st_mode & 0o777 == dir_mode
        assert (tmp_path / f"cache-{umask:o}" / "x.npy").stat().st_mode & 0o777 == file_mode
    assert not list(tmp_path.glob(".*"))  # no temporary file or directory left
