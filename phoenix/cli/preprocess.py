r"""``phoenix preprocess``: tokenize JSONL into a megatron-core indexed dataset
(PREFIX.bin/.idx + .meta.json).

Exit status 2 with one line naming the file when an input cannot be used (missing,
unreadable, not the compression its name says, truncated, not UTF-8), a line cannot be
encoded, or more than --max-skipped-fraction (default 1%) of the lines are malformed;
1 when a worker process dies. Either way no output is written.

Example:
    phoenix preprocess --input data/web.jsonl.gz --output-prefix data/web \
        --tokenizer-model data/tok.model --group-key repo --workers 4 --tags web,en
"""

from __future__ import annotations

import argparse
import logging
import sys

from phoenix.data.preprocess import WorkerDiedError, preprocess
from phoenix.runtime.command import HelpFormatter


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(formatter_class=HelpFormatter,
        prog="phoenix preprocess", description=__doc__,
    )
    p.add_argument("--input", nargs="+", required=True,
                   help="UTF-8 JSONL files, plain or compressed by name: .gz, .bz2, .xz")
    p.add_argument("--output-prefix", required=True, help="writes PREFIX.bin/.idx/.meta.json")
    p.add_argument("--tokenizer-model", required=True,
                   help="SentencePiece .model file, Hugging Face tokenizer.json, or a Hugging "
                        "Face tokenizer folder")
    p.add_argument("--text-key", default="text", help="JSON key holding the document text")
    p.add_argument("--append-eod", action=argparse.BooleanOptionalAction, default=True,
                   help="append the tokenizer's EOS id after every document (default: on)")
    p.add_argument("--group-key", default=None,
                   help="JSON key grouping adjacent documents; writes PREFIX.groups.npy")
    p.add_argument("--workers", type=int, default=1, help="tokenizer processes")
    p.add_argument("--chunk-lines", type=int, default=256, help="lines per worker task")
    p.add_argument("--name", default=None, help="dataset name for meta.json (default: prefix)")
    p.add_argument("--tags", default="", help="comma-separated tags for meta.json")
    p.add_argument("--no-progress", action="store_true", help="disable the progress bar")
    p.add_argument("--max-skipped-fraction", type=float, default=0.01, metavar="F",
                   help="fail, writing nothing, when more than this fraction of the input "
                        "lines is malformed (1 keeps whatever parses)")
    args = p.parse_args(argv)
    from phoenix.data.indexed import data_only_process

    data_only_process()  # a data tool: megatron-core without compiled kernels (start-up)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("megatron").setLevel(logging.WARNING)  # its import-time INFO chatter
    try:
        meta = preprocess(
            args.input,
            args.output_prefix,
            args.tokenizer_model,
            text_key=args.text_key,
            append_eod=args.append_eod,
            group_key=args.group_key,
            workers=args.workers,
            name=args.name,
            tags=args.tags,
            chunk_lines=args.chunk_lines,
            progress=False if args.no_progress else None,
            max_skipped_fraction=args.max_skipped_fraction,
        )
    except (OSError, ValueError) as e:  # input errors (naming the file): one line, no traceback
        print(f"phoenix preprocess: error: {e}", file=sys.stderr)
        return 2
    except WorkerDiedError as e:  # not the input's fault, but no traceback either
        print(f"phoenix preprocess: error: {e}", file=sys.stderr)
        return 1
    print(
        f"{meta['name']}: {meta['num_documents']} documents, {meta['num_tokens']} tokens "
        f"({meta['dtype']}), {meta['skipped_lines']} skipped lines -> {args.output_prefix}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
