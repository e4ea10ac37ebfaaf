"""Who prints, in real torchrun jobs on gloo: the step line once per logged step from the
logging rank wherever the layout puts it, and an input error once per job.

* PP=2 x DP=2 on 4 processes: the logging rank (last stage, DP 0) is global rank 2,
  neither rank 0 nor the last rank; its step lines reach the console, once each.
* A data path that does not exist (raised on every rank together): one error line, the
  last phoenix line of the job, exit code 2.
* Ranks that fail together leave the line to rank 0; a rank that fails alone (before the
  process group or inside it, rank 0 working on) prints it itself.
"""

from __future__ import annotations

import re
import textwrap

import pytest
import yaml

from phoenix.testing.processes import kill_tree, start, torchrun_args
from phoenix.testing.tiny import tiny_config_dict

pytestmark = pytest.mark.slow

STEP_LINE = re.compile(r"^\S+ \[rank (\d+)\] step +(\d+)/3 \| loss ")
ERROR_LINE = re.compile(r"^(\[rank \d+\] )?phoenix: ")
# What phoenix writes: its log lines (time first) and its error lines.
PHOENIX_LINE = re.compile(r"^(\d\d:\d\d:\d\d |(\[rank \d+\] )?phoenix: )")


def torchrun(tmp_path, nproc: int, args: list, tag: str, timeout: float = 300) -> tuple[int, str]:
    log = tmp_path / f"{tag}.log"
    proc = start([*torchrun_args(nproc), *map(str, args)], log, cwd=tmp_path)
    try:
        code = proc.wait(timeout=timeout)
    finally:
        kill_tree(proc)
    return code, log.read_text()


def write_config(tmp_path, tiny_data, **sections) -> str:
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(tiny_config_dict(tiny_data, tmp_path / "run", **sections)))
    return str(path)


def exit_codes(log: str) -> list[int]:
    """The workers' exit codes in torchrun's failure summary (torchrun itself exits 1)."""
    return [int(c) for c in re.findall(r"exitcode +: (-?\d+)", log)]


def error_lines(log: str) -> list[str]:
    return [line for line in log.splitlines() if ERROR_LINE.match(line)]


def last_phoenix_line(log: str) -> str:
    return [line for line in log.splitlines() if PHOENIX_LINE.match(line)][-1]


def test_pp2_dp2_prints_each_step_line_once(tiny_data, tmp_path):
    cfg = write_config(tmp_path, tiny_data, train={"steps": 3})
    code, log = torchrun(tmp_path, 4, ["-m", "phoenix.train", cfg, "parallel.pipeline=2"], "pp2dp2")
    assert code == 0, log[-4000:]
    steps = [STEP_LINE.match(line).groups() for line in log.splitlines() if STEP_LINE.match(line)]
    assert steps == [("2", "1"), ("2", "2"), ("2", "3")], log[-4000:]


def test_data_error_on_every_rank_is_printed_once(tiny_data, tmp_path):
    missing = tmp_path / "nowhere" / "web"
    datasets = [{"prefix": str(missing), "weight": 1.0, "name": "web"}]
    cfg = write_config(tmp_path, tiny_data, data={"datasets": datasets})
    code, log = torchrun(tmp_path, 2, ["-m", "phoenix.train", cfg], "missing")
    assert code != 0 and 2 in exit_codes(log), log[-4000:]
    (line,) = error_lines(log)
    assert line.startswith("[rank 0] phoenix: DataError: ") and f"missing file {missing}.idx" in line
    assert last_phoenix_line(log) == line
    assert not re.search(r"File \".*/phoenix/", log), log[-4000:]  # no worker traceback


# Ranks of a torchrun job that stop on a ConfigError: on every rank, or on rank 1 alone
# (before the process group, or inside it while rank 0 waits in a collective).
FAILING = textwrap.dedent("""
    import os, sys, time
    import torch.distributed as dist
    from phoenix.config import ConfigError
    from phoenix.runtime import command

    command.ERROR_WAIT = 1.0
    mode, rank = sys.argv[1], int(os.environ["RANK"])

    def body():
        if mode == "in_group":
            dist.init_process_group("gloo")
        if mode == "every_rank" or rank == 1:
            raise ConfigError(f"train.nope: unknown key ({mode})")
        if mode == "in_group":
            dist.barrier()  # never met: rank 1 has stopped
        else:
            time.sleep(120)  # working on, until torchrun stops it
        return 0

    sys.exit(command.run_command(body))
""")


@pytest.mark.parametrize("mode, printer", [("every_rank", 0), ("alone", 1), ("in_group", 1)])
def test_an_error_is_printed_once_by_rank_0_or_the_rank_that_failed_alone(tmp_path, mode, printer):
    script = tmp_path / "failing.py"
    script.write_text(FAILING)
    code, log = torchrun(tmp_path, 2, [script, mode], mode, timeout=120)
    assert code != 0 and 2 in exit_codes(log), log[-4000:]
    assert error_lines(log) == [f"[rank {printer}] phoenix: config error: train.nope: unknown key "
                                f"({mode})"], log[-4000:]
