"""A save that fails (a full disk): one line on every rank's behalf, no traceback, the
temporary directory removed, the previous checkpoint intact; the run stops (exit code 3)
or, with ``checkpoint.on_save_error: continue``, trains on and tries again at the next
interval. A dead writer's temporary directory is swept when the next job starts. The real
thing runs on a small tmpfs (needs root to mount it; skipped otherwise)."""

import contextlib
import errno
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from phoenix.checkpoint import find_latest
from phoenix.checkpoint.save_failures import (
    CheckpointSaveError,
    SaveSpace,
    human_bytes,
    sweep_unfinished_saves,
)
from phoenix.checkpoint.sharded_save import SaveFailed, is_no_space
from phoenix.runtime.run_lock import LOCK_NAME, RunLock
from phoenix.testing.processes import start, torchrun_args
from phoenix.testing.tiny import tiny_config_dict


def test_a_full_disk_is_recognised_through_wrappers():
    enospc = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    assert is_no_space(enospc)
    try:  # megatron: the writer's error re-raised as a cause
        raise RuntimeError("Worker failure") from enospc
    except RuntimeError as e:
        assert is_no_space(e)
    # torch's CheckpointException carries each rank's error, which crossed a process
    # boundary as text: "[Errno 28] No space left on device"
    wrapped = RuntimeError(f"Worker failure: {enospc}")
    failures = type("CheckpointException", (BaseException,), {})("write")
    failures.failures = {1: (wrapped, None)}
    assert is_no_space(failures)
    assert not is_no_space(RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos"))
    assert not is_no_space(OSError(errno.EIO, "I/O error"))


@pytest.mark.slow
def test_a_write_that_fails_on_one_rank_fails_on_every_rank():
    """The agreement after each write of a save (rank 0 alone writes common.pt, .metadata,
    metadata.json): no rank is left waiting in a collective, every rank raises."""
    from phoenix.testing.distributed import run_distributed
    from phoenix.testing.processes import save_writes_failing_on_one_rank

    cases = [(0, errno.ENOSPC), (1, errno.EIO), (None, 0)]
    rank0, rank1 = run_distributed(save_writes_failing_on_one_rank, 2, cases)
    assert rank0 == ["SaveFailed: no_space=True own=True", "SaveFailed: no_space=False own=False",
                     "no error"]
    assert rank1 == ["SaveFailed: no_space=True own=False", "SaveFailed: no_space=False own=True",
                     "no error"]


def test_the_failure_is_one_line_with_free_and_needed_bytes(tmp_path):
    space = SaveSpace(tmp_path, free=1_900_000, needed=4_300_000, basis="the size of step_000004")
    assert not space.fits
    err = CheckpointSaveError(8, tmp_path, "RuntimeError: unexpected pos 832 vs 726", False, space,
                              tmp_path / "step_000004")
    text = str(err)
    assert "\n" not in text and err.no_space  # the estimate says it did not fit
    assert text == (f"checkpoint step_000008 was not saved: no space left on device in {tmp_path} "
                    f"(1.8 MB free before the save, about 4.1 MB needed); its temporary directory "
                    f"was removed and the previous checkpoint step_000004 is intact")
    other = CheckpointSaveError(2, tmp_path, str(SaveFailed(OSError(errno.EIO, "I/O error"), False)),
                                False, SaveSpace(tmp_path, 10**9, 10, "x"), None)
    assert "was not saved: OSError: [Errno 5] I/O error in" in str(other)
    assert str(other).endswith("the run has no earlier checkpoint")
    assert human_bytes(512) == "512 B" and human_bytes(3 * 2**30) == "3.0 GB"


def test_the_free_space_check_uses_the_larger_of_estimate_and_last_checkpoint(tmp_path, monkeypatch):
    previous = tmp_path / "step_000004"
    previous.mkdir()
    (previous / "shard").write_bytes(b"x" * 5000)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**6, 10**6, 4096))
    space = SaveSpace.measure(tmp_path, 3000, previous)
    assert (space.free, space.needed, space.basis) == (4096, 5000, "the size of step_000004")
    assert not space.fits
    space = SaveSpace.measure(tmp_path / "not" / "yet", 4000, None)  # the first save
    assert (space.needed, space.basis, space.fits) == (4000, "the size of its shards", True)


def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def test_unfinished_saves_are_swept_unless_a_live_job_holds_the_run(tmp_path):
    root = tmp_path / "checkpoints"
    (root / ".tmp-step_000010" / "rng").mkdir(parents=True)
    (root / ".tmp-step_000010" / "__0_0.distcp").write_bytes(b"x" * 100)
    (root / "step_000004").mkdir()
    lock = tmp_path / LOCK_NAME  # held by a live job on this machine (our parent process)
    lock.write_text(json.dumps(dict(RunLock(tmp_path).record, pid=os.getppid(), process_start="")))
    assert sweep_unfinished_saves(tmp_path) == []  # it may be saving
    lock.write_text(json.dumps(dict(RunLock(tmp_path).record, pid=_dead_pid())))
    assert sweep_unfinished_saves(tmp_path) == [(".tmp-step_000010", 100)]
    assert sorted(p.name for p in root.iterdir()) == ["step_000004"]
    assert sweep_unfinished_saves(tmp_path / "none") == []


def test_a_failed_periodic_save_stops_or_continues_by_policy(caplog):
    """checkpoint.on_save_error: ``stop`` re-raises, ``continue`` logs and returns None;
    the save at the end of the job raises under either."""
    from types import SimpleNamespace

    from phoenix.checkpoint.checkpointer import Checkpointer

    def failing(step, background=False):
        raise CheckpointSaveError(step, Path("/run/checkpoints"), "x", True, None, None)

    for policy in ("stop", "continue"):
        ckpt = Checkpointer.__new__(Checkpointer)
        ckpt.ckpt = SimpleNamespace(save_interval=4, save_at_end=True, on_save_error=policy,
                                    async_save=False)
        ckpt.cfg = SimpleNamespace(train=SimpleNamespace(steps=20, stop_at_step=None))
        ckpt.layout = SimpleNamespace(rank=0)
        ckpt.save_now, ckpt.latest_step = failing, lambda: 4
        if policy == "stop":
            with pytest.raises(CheckpointSaveError):
                ckpt.save(8)
        else:
            assert ckpt.save(8) is None
            assert "saves again at step 12" in caplog.text
        with pytest.raises(CheckpointSaveError):
            ckpt.save(20, last=True)


@contextlib.contextmanager
def small_tmpfs(path: Path, size: str):
    path.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {done.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def _fill(directory: Path) -> None:
    """Write into ``directory`` until the file system is full."""
    directory.mkdir(parents=True)
    with open(directory / "__0_0.distcp", "wb") as f:
        with contextlib.suppress(OSError):
            while True:
                f.write(b"\0" * 65536)
                f.flush()


@pytest.mark.slow
def test_a_full_disk_fails_the_save_cleanly(tiny_data, tmp_path):
    """Two ranks on a 6 MB tmpfs, checkpoints of 4.3 MB. A dead job's unfinished save has
    filled the disk: it is swept before anything is written (not even the run lock fit).
    The save at step 4 fits; step 8 does not (``continue``: one line, training goes on);
    the save at the end (step 12) fails too, and a failed last save stops the job."""
    with small_tmpfs(tmp_path / "disk", "6m") as disk:
        cfg = tiny_config_dict(tiny_data, disk / "run", train={"steps": 12},
                               data={"cache_dir": str(tmp_path / "cache")},
                               checkpoint={"save_interval": 4, "save_at_end": True,
                                           "on_save_error": "continue"})
        recipe = tmp_path / "run.yaml"
        recipe.write_text(yaml.safe_dump(cfg))
        ckpts = disk / "run" / "checkpoints"
        _fill(ckpts / ".tmp-step_000008")  # a job killed during a save
        log = tmp_path / "run.log"
        proc = start(["-m", "phoenix.cli", "torchrun", *torchrun_args(2)[2:], "-m",
                      "phoenix.train", recipe], log)
        try:
            code = proc.wait(timeout=300)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, 9)
        out = log.read_text()
        assert code == 3, out
        assert "Traceback" not in out and "inline_container" not in out, out
        assert re.search(r"removed \.tmp-step_000008 \(\d+ bytes\), the unfinished save", out), out
        failed = re.findall(r"checkpoint step_(\d+) was not saved: no space left on device in "
                            r"\S+ \(\d+\.\d MB free before the save, about 4\.\d MB needed\); its "
                            r"temporary directory was removed and the previous checkpoint "
                            r"step_000004 is intact(.*)", out)
        assert [(int(s), rest) for s, rest in failed] == [
            (8, "; training continues (checkpoint.on_save_error: continue) and saves again at "
                "the end of the job"), (12, "")], out
        assert re.search(r"step +12/12", out), out  # trained on after the failure
        assert "phoenix: stopped: checkpoint step_000012 was not saved" in out
        assert "the save will likely fail" in out  # the free-space check before each save
        assert find_latest(ckpts).name == "step_000004"
        assert sorted(p.name for p in ckpts.iterdir()) == ["latest", "step_000004"]
