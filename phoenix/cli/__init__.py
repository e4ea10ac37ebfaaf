"""The ``phoenix`` command: ``phoenix <cmd> [args ...]``; ``phoenix --help`` lists them.

Each command is a module with ``main(argv) -> int`` (argparse prog ``phoenix <cmd>``;
user errors are one line on stderr and exit status 2). The module is imported only when
its command runs, so ``phoenix --help`` and the light commands start without torch.
``python -m phoenix.cli <cmd>`` is the same command without the console script.
"""

from __future__ import annotations

import difflib
import importlib
import sys
import warnings

COMMANDS = {
    "train": "phoenix.train.run",
    "torchrun": "phoenix.runtime.launch",
    "eval": "phoenix.eval.run",
    "generate": "phoenix.cli.generate",
    "lr-plot": "phoenix.cli.lr_plot",
    "preprocess": "phoenix.cli.preprocess",
    "train-tokenizer": "phoenix.cli.train_tokenizer",
    "make-corpus": "phoenix.cli.make_corpus",
    "build-plan": "phoenix.cli.build_plan",
    "inspect-batch": "phoenix.cli.inspect_batch",
    "describe": "phoenix.cli.describe",
    "convert": "phoenix.cli.convert",
    "upcycle": "phoenix.cli.upcycle",
    "tokenizer": "phoenix.cli.tokenizer_check",
    "expand-vocab": "phoenix.cli.expand_vocab",
    "compare-checkpoints": "phoenix.cli.compare_checkpoints",
    "score-data": "phoenix.cli.score_data",
    "reshard": "phoenix.cli.reshard",
    "report": "phoenix.cli.report",
}
"""Command name -> the module whose ``main(argv)`` runs it."""

SUMMARIES = {
    "train": "train from a YAML recipe (launch under torchrun for several processes)",
    "torchrun": "torchrun whose Ctrl-C lets the workers save and exit 0 (same arguments)",
    "eval": "evaluate a checkpoint: held-out loss, perplexity, top-1/top-5; needle test (--needle)",
    "generate": "continue text prompts with a checkpoint (KV cache; greedy or top-k/top-p sampling)",
    "lr-plot": "write a recipe's LR schedule as lr.csv and lr.png, before training",
    "preprocess": "tokenize JSONL into a megatron-core indexed dataset (.bin/.idx)",
    "train-tokenizer": "train a byte-fallback SentencePiece tokenizer",
    "make-corpus": "write a deterministic synthetic JSONL corpus (web / code / math)",
    "build-plan": "build and cache a recipe's data plans and print their summary",
    "inspect-batch": "print the documents of one global batch of a run",
    "describe": "parameters, FLOPs per token and memory per GPU of a recipe's layout",
    "convert": "Hugging Face <-> phoenix checkpoints (hf-to-phoenix, phoenix-to-hf)",
    "upcycle": "a dense checkpoint as a MoE one (experts from the dense MLP, granular too)",
    "tokenizer": "tokenizer tools: check A B --corpus FILE (do two tokenizers agree?)",
    "expand-vocab": "append tokens to a tokenizer (no id changes) and resize a checkpoint to it",
    "compare-checkpoints": "per layer/part weight and Adam-state change between checkpoints (CSV, heatmap)",
    "score-data": "per-document loss, perplexity and Min-K% of a dataset under a checkpoint; --keep filters",
    "reshard": "rewrite a dp_reshardable checkpoint so that it resumes at any TP/PP/EP",
    "report": "one HTML page (PNGs, report.json) of runs' curves, per-layer heatmaps, spikes",
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: phoenix <command> [args ...]   (phoenix <command> --help for its options;"
             " phoenix --version)",
             "", "commands:"]
    lines += [f"  {name:<{width}}  {SUMMARIES[name]}" for name in COMMANDS]
    return "\n".join(lines)


def version() -> str:
    """phoenix's version and the versions of the stack it runs on, read from the installed
    packages' metadata (importing torch for its version would cost seconds)."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed

    from phoenix import __version__

    def of(package: str) -> str:
        try:
            return installed(package)
        except PackageNotFoundError:
            return "not installed"

    return (f"phoenix {__version__} (megatron-core {of('megatron-core')}, torch {of('torch')}, "
            f"Python {sys.version.split()[0]})")


def unknown_command(name: str) -> str:
    close = difflib.get_close_matches(name, list(COMMANDS), n=1, cutoff=0.6)
    hint = f" (did you mean '{close[0]}'?)" if close else " (phoenix --help lists them)"
    return f"phoenix: error: unknown command '{name}'{hint}"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    if argv and argv[0] in ("-V", "--version"):
        print(version())
        return 0
    if not argv or argv[0] not in COMMANDS:
        if argv:  # a typo: the one line, not the whole usage above it
            print(unknown_command(argv[0]), file=sys.stderr)
        else:
            print(usage(), file=sys.stderr)
        return 2
    # megatron-core warns at import that TE/Apex are missing; the commands that build a
    # model log the layer spec and backend they use instead (set before any import).
    warnings.filterwarnings("ignore", message=r".*(Transformer Engine|Apex|apex).*"
                                              r"(not installed|Falling back).*")
    return importlib.import_module(COMMANDS[argv[0]]).main(argv[1:])
