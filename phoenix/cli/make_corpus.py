r"""``phoenix make-corpus``: write a deterministic synthetic JSONL corpus (web / code /
math styles; .gz supported), for trying a recipe without real data.

Example:
    phoenix make-corpus --output data/code.jsonl.gz --num-docs 2000 --seed 1 \
        --domain code --group-key repo --docs-per-group 2 12
"""

from __future__ import annotations

import argparse
import sys

from phoenix.data.synthetic import DOMAINS, write_corpus
from phoenix.runtime.command import HelpFormatter


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(formatter_class=HelpFormatter,
        prog="phoenix make-corpus", description=__doc__,
    )
    p.add_argument("--output", required=True, help="JSONL path; gzip if it ends in .gz")
    p.add_argument("--num-docs", type=int, required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--domain", default="web", choices=DOMAINS)
    p.add_argument("--group-key", default=None, help="add this key; adjacent docs share a value")
    p.add_argument("--docs-per-group", type=int, nargs=2, default=(1, 8), metavar=("MIN", "MAX"))
    p.add_argument("--min-words", type=int, default=20)
    p.add_argument("--max-words", type=int, default=200)
    args = p.parse_args(argv)
    try:
        path = write_corpus(
            args.output,
            args.num_docs,
            args.seed,
            group_key=args.group_key,
            docs_per_group=tuple(args.docs_per_group),
            min_words=args.min_words,
            max_words=args.max_words,
            domain=args.domain,
        )
    except (OSError, ValueError) as e:
        print(f"phoenix make-corpus: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.num_docs} {args.domain} documents to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
