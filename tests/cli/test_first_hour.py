"""A user's first hour with the ``phoenix`` command (issue 23): the version, did-you-mean
for commands and recipe paths, ``--help`` that pastes, and a train launch that does not
fit its layout saying how to launch it. In-process: each command's ``main(argv)``."""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest

from phoenix.cli import main as phoenix

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _one_process(monkeypatch):
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(ROOT)


def test_version(capsys):
    import phoenix as package

    assert phoenix(["--version"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"phoenix {package.__version__} (megatron-core 0.16.1, torch ")


@pytest.mark.parametrize("typo,meant", [("trian", "train"), ("convrt", "convert"),
                                        ("preproces", "preprocess")])
def test_did_you_mean_a_command(capsys, typo, meant):
    assert phoenix([typo]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"phoenix: error: unknown command '{typo}' (did you mean '{meant}'?)"


def test_did_you_mean_a_recipe(capsys):
    assert phoenix(["train", "configs/quickstrat.yaml", "--dry-run"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["phoenix: config error: config file not found: configs/quickstrat.yaml "
                   "(did you mean configs/quickstart.yaml or configs/quickstart_moe.yaml?)"]
    assert phoenix(["describe", "long_context.yaml"]) == 2  # the name without its folder
    assert "did you mean configs/recipes/long_context.yaml?" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["preprocess", "make-corpus", "train-tokenizer"])
def test_help_examples_paste_as_written(capsys, command):
    """The example in each epilog keeps its backslash continuation on its own line (a
    plain docstring joined the lines into one with a run of spaces)."""
    with pytest.raises(SystemExit):
        phoenix([command, "--help"])
    out = capsys.readouterr().out
    example = [line for line in out.splitlines() if line.strip().startswith(f"phoenix {command}")]
    assert example and example[0].rstrip().endswith("\\"), example
    assert "    " not in example[0].strip()
    # the continued example is one command a shell would parse
    lines = out.splitlines()
    i = lines.index(example[0])
    words = shlex.split(lines[i].rstrip("\\") + " " + lines[i + 1])
    assert words[:2] == ["phoenix", command] and len(words) > 4


def test_help_shows_defaults(capsys):
    with pytest.raises(SystemExit):
        phoenix(["preprocess", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "JSON key holding the document text (default: text)" in out


def test_train_that_does_not_fit_says_how_to_launch(capsys):
    """The README's first example used to stop at `world size 1 is not divisible` with no
    way forward (the quickstart recipe is PP=2)."""
    assert phoenix(["train", "configs/quickstart.yaml", "train.steps=100"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["phoenix: config error: parallel: world size 1 is not divisible by "
                   "tensor*pipeline*context = 1*2*1; launch 2 processes (phoenix torchrun "
                   "--standalone --nproc_per_node 2 -m phoenix.train configs/quickstart.yaml "
                   "train.steps=100), or run on one process with parallel.pipeline=1"]


def test_dry_run_takes_the_smallest_world_that_fits(capsys):
    """Without WORLD_SIZE, --dry-run checks the layout at the smallest world it fits (2 for
    the PP=2 quickstart), as describe does; no overrides are needed."""
    assert phoenix(["train", "configs/quickstart.yaml", "--dry-run"]) == 0
    captured = capsys.readouterr()
    assert "name: quickstart" in captured.out and "pipeline: 2" in captured.out
