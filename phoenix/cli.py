"""``phoenix`` command: ``train CONFIG [k=v ...]``, ``eval CHECKPOINT CONFIG``, ``lr-plot CONFIG --out DIR``."""

from __future__ import annotations

import sys

COMMANDS = {
    "train": "phoenix.train.run",
    "lr-plot": "phoenix.optim.lr_plot",
    "eval": "phoenix.eval.run",
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print("usage: phoenix {" + ",".join(COMMANDS) + "} ...", file=sys.stderr)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    import importlib

    return importlib.import_module(COMMANDS[argv[0]]).main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
