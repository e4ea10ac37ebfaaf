"""Every ``phoenix ...`` command shown in README.md and docs/*.md parses as written (issue
23): the command exists, its own argparse parser (the one ``phoenix <cmd> --help``
prints) accepts its flags and arguments, and every ``key=value`` override names a config
key that exists. Placeholders in capitals (RECIPE, OUT) and ``[optional ...]`` brackets
are read as written; nothing is run."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import io
import re
import shlex
import typing
from pathlib import Path

import pytest

from phoenix.cli import COMMANDS
from phoenix.config.schema import RunConfig

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
PLACEHOLDER_OVERRIDES = {"key=value", "k=v", "dotted.key=value"}


# ---- finding the commands -------------------------------------------------------------

def commands_in(text: str) -> list[tuple[str, bool]]:
    """``phoenix <cmd> ...`` lines of fenced blocks (backslash continuations joined, shell
    comments and ``VAR=x`` prefixes dropped), which must parse whole, and inline code
    spans, which may name a command with only some of its arguments (``phoenix train
    --dry-run`` in a sentence): (command, whole)."""
    found = []
    blocks = re.findall(r"^```[^\n]*\n(.*?)^```", text, flags=re.S | re.M)
    for block in blocks:
        for line in block.replace("\\\n", " ").splitlines():
            line = line.strip().removeprefix("$ ")
            line = re.sub(r"^(\w+=\S+\s+)+", "", line)  # WORLD_SIZE=32 phoenix ...
            line = line.split(" # ")[0].split("   #")[0]
            if re.match(r"phoenix [a-z-]", line):
                found.append((line, True))
    outside = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
    for span in re.findall(r"`([^`]+)`", outside):  # a span may wrap onto the next line
        span = " ".join(span.split())
        if "\n\n" not in span and (re.match(r"phoenix [a-z-]", span)
                                    or span in ("phoenix --help", "phoenix --version")):
            found.append((span, False))
    return found


def all_doc_commands() -> list[tuple[str, str, bool]]:
    return [(path.name, c, whole) for path in DOCS for c, whole in commands_in(path.read_text())]


# ---- the commands' own parsers ---------------------------------------------------------

class _Captured(Exception):
    def __init__(self, parser, method):
        self.parser, self.method = parser, method


_ENTRY_POINTS = ("parse_args", "parse_intermixed_args", "parse_known_args")


def parser_of(command: str) -> tuple[argparse.ArgumentParser, str]:
    """The parser ``phoenix <command>``'s ``main`` builds, and the method it parses with:
    ``main`` runs until it asks its parser to parse, which is where it is stopped."""
    originals = {name: getattr(argparse.ArgumentParser, name) for name in _ENTRY_POINTS}

    def stop(method):
        def entry(self, *args, **kwargs):
            raise _Captured(self, method)
        return entry

    try:
        for name in _ENTRY_POINTS:
            setattr(argparse.ArgumentParser, name, stop(name))
        importlib.import_module(COMMANDS[command]).main([])
    except _Captured as c:
        return c.parser, c.method
    finally:
        for name, fn in originals.items():
            setattr(argparse.ArgumentParser, name, fn)
    raise AssertionError(f"phoenix {command}: main() returned without parsing its arguments")


def _field_type(tp):
    """The dataclass (or None: a free-form value) a config field's type leads to."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, __import__("types").UnionType):
        inner = [a for a in typing.get_args(tp) if a is not type(None)]
        return _field_type(inner[0]) if len(inner) == 1 else None
    if origin in (list, tuple):
        return ("list", _field_type((typing.get_args(tp) or (None,))[0]))
    return tp if dataclasses.is_dataclass(tp) else None


def config_key_error(dotted: str) -> str | None:
    """None when ``dotted`` (``data.datasets[0].weight``) names a key of RunConfig, else
    what is wrong with it. Below a free-form field (a mapping, Any) every key is allowed."""
    node: typing.Any = RunConfig
    for part in dotted.split("."):
        m = re.fullmatch(r"(\w+)(\[\d+\])?", part)
        if m is None:
            return f"'{part}' is not a key"
        if node is None:
            return None
        hints = typing.get_type_hints(node)
        if m.group(1) not in {f.name for f in dataclasses.fields(node)}:
            return f"'{m.group(1)}' is not a key of {node.__name__}"
        node = _field_type(hints[m.group(1)])
        if isinstance(node, tuple):  # a list of dataclasses: needs an index to go further
            node = node[1] if m.group(2) else None
    return None


def _unbracket(word: str) -> str:
    """``[--tp`` -> ``--tp``, ``1]`` -> ``1``; ``datasets[0].weight`` stays as it is."""
    word = word.removeprefix("[")
    return word[:-1] if word.endswith("]") and word.count("]") > word.count("[") else word


def check_command(line: str, whole: bool = True) -> str | None:
    """None when ``line`` parses as ``phoenix`` would parse it, else why not. Not
    ``whole``: only its subcommand, flags and overrides are checked."""
    words = [_unbracket(w) for w in shlex.split(line)]
    words = [w for w in words if w not in ("", "...", "…", "|")]
    assert words[0] == "phoenix"
    if words[1:] in (["--help"], ["--version"], ["-h"]):
        return None
    command, args = words[1], words[2:]
    if command not in COMMANDS:
        return f"no command '{command}'"
    if command == "torchrun":
        if not args:
            return None
        from torch.distributed.run import get_args_parser

        parsed, problem = _parse(get_args_parser(), "parse_args", args)
        if problem:
            return problem
        if not parsed.module or parsed.training_script not in ("phoenix.train", "phoenix.cli"):
            return "phoenix torchrun runs -m phoenix.train or -m phoenix.cli <command>"
        if parsed.training_script == "phoenix.train":
            command, args = "train", parsed.training_script_args
        else:  # python -m phoenix.cli <command> ...
            if not parsed.training_script_args or parsed.training_script_args[0] not in COMMANDS:
                return "-m phoenix.cli: no such command"
            command, args = parsed.training_script_args[0], parsed.training_script_args[1:]
    parser, method = parser_of(command)
    if whole:
        parsed, problem = _parse(parser, method, args)
        if problem:
            return problem
        overrides = getattr(parsed, "overrides", None) or []
        if command == "lr-plot":  # CONFIG.yaml [key=value ...] in one positional
            overrides = parsed.args[1:]
    else:
        problem, overrides = _flags_and_overrides(parser, args)
        if problem:
            return problem
    for item in overrides:
        if item in PLACEHOLDER_OVERRIDES:
            continue
        key, sep, _ = item.partition("=")
        if not sep:
            return f"override '{item}' is not key=value"
        error = config_key_error(key)
        if error:
            return f"override '{item}': {error}"
    return None


def _flags_and_overrides(parser, args):
    """(problem or None, overrides) of a partial command line: its subcommand (where the
    parser has some) must exist and each ``--flag`` must be one of the parser's."""
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if subs and args:
        if args[0] not in subs[0].choices:
            return f"{parser.prog}: no subcommand '{args[0]}'", []
        parser, args = subs[0].choices[args[0]], args[1:]
    known = {o for a in parser._actions for o in a.option_strings}
    for word in args:
        if word.startswith("-") and word.split("=")[0] not in known:
            return f"{parser.prog}: unrecognized arguments: {word}", []
    has_overrides = any(a.dest in ("overrides", "args") for a in parser._actions)
    overrides = [w for w in args if has_overrides and re.match(r"[a-z_][\w.\[\]]*=", w)]
    return None, overrides


def _parse(parser, method, args):
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            return getattr(parser, method)(args), None
    except SystemExit:
        return None, err.getvalue().strip().splitlines()[-1]


# ---- the tests ---------------------------------------------------------------------------

def test_docs_show_commands():
    """The extraction finds the commands a reader copies (guards the test itself)."""
    found = [c for _, c, _ in all_doc_commands()]
    assert len(found) > 40
    assert any(c.startswith("phoenix train configs/quickstart.yaml parallel.pipeline=1")
               for c in found)
    assert any(c.startswith("phoenix torchrun") for c in found)
    assert {c.split()[1] for c in found} >= {"train", "describe", "preprocess", "convert",
                                              "build-plan", "lr-plot", "eval", "expand-vocab"}


def test_every_documented_command_parses():
    bad = [f"{where}: {line}\n    -> {problem}" for where, line, whole in all_doc_commands()
           if (problem := check_command(line, whole))]
    assert not bad, "commands in the docs that phoenix would refuse:\n" + "\n".join(bad)


@pytest.mark.parametrize("line,problem", [
    ("phoenix trian configs/quickstart.yaml", "no command 'trian'"),
    ("phoenix train configs/quickstart.yaml --dryrun", "unrecognized arguments: --dryrun"),
    ("phoenix train configs/quickstart.yaml train.stepz=100",
     "override 'train.stepz=100': 'stepz' is not a key of TrainConfig"),
    ("phoenix describe configs/recipes/long_context.yaml --gpus 64 --vocab-size 3",
     "unrecognized arguments"),
    ("phoenix convert hf-to-phoenix /m out --tp 4 --pipeline 2", "unrecognized arguments"),
    ("phoenix torchrun --nproc_per_node 2 -m phoenix.train c.yaml data.datasets[0].weigth=1",
     "'weigth' is not a key of DatasetEntry"),
])
def test_a_wrong_flag_or_key_fails(line, problem):
    """The check can fail: each of these is a slip away from a documented command, and
    fails in a code block (parsed whole) and in a sentence (flags and keys only)."""
    for whole in (True, False):
        found = check_command(line, whole)
        assert found is not None and problem in found, (whole, found)


def test_right_keys_pass():
    assert check_command("phoenix train r.yaml logging.callbacks.norms=false "
                         "data.datasets[1].weight=0.2 model.rope.base=1e6 --dry-run") is None
