"""``phoenix convert``: Hugging Face <-> phoenix checkpoints (Llama / Qwen2 / Mistral, and
the MoE Mixtral / Qwen2-MoE).

    phoenix convert hf-to-phoenix HF_DIR OUT [--tp N --pp N --ep N] [--dtype bf16]
    phoenix convert phoenix-to-hf CKPT OUT [--dtype bf16] [--max-shard-size-gb 5]

hf-to-phoenix writes OUT/checkpoints/step_000000 (TP=PP=1; it loads at any TP/PP through
``checkpoint.init_from: OUT``), OUT/model.yaml (use as ``model.preset``), OUT/tokenizer/
and OUT/hf_import.json; --tp/--pp/--ep are checked (TP must divide heads, query groups, the
padded vocab and the FFNs; PP the layers; EP the experts) and recorded as the suggested
layout.
phoenix-to-hf writes safetensors shards, model.safetensors.index.json, config.json, the
tokenizer files and phoenix_export.json (tokenizer fingerprint). Both run in one process
on CPU and never leave a partial OUT behind. Unsupported architectures, config keys and
tensors are refused by name (exit status 2).
"""

from __future__ import annotations

import argparse
import logging
import sys

from phoenix.runtime.command import HelpFormatter


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(formatter_class=HelpFormatter,
                                prog="phoenix convert", description=__doc__)
    sub = p.add_subparsers(dest="direction", required=True)
    imp = sub.add_parser("hf-to-phoenix", formatter_class=HelpFormatter,
                         help="a Hugging Face folder -> a phoenix checkpoint")
    imp.add_argument("hf_dir")
    imp.add_argument("out")
    imp.add_argument("--tp", type=int, default=1, help="suggested tensor parallel size (checked)")
    imp.add_argument("--pp", type=int, default=1, help="suggested pipeline parallel size (checked)")
    imp.add_argument("--ep", type=int, default=1,
                     help="suggested expert parallel size (checked; MoE models)")
    imp.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default=None,
                     help="weights dtype (default: the source's)")
    exp = sub.add_parser("phoenix-to-hf", formatter_class=HelpFormatter,
                         help="a phoenix checkpoint -> a Hugging Face folder")
    exp.add_argument("checkpoint", help="a checkpoint folder, a run folder or an hf-to-phoenix OUT")
    exp.add_argument("out")
    exp.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default=None,
                     help="weights dtype (default: the checkpoint's)")
    exp.add_argument("--max-shard-size-gb", type=float, default=5.0)
    for q in (imp, exp):
        q.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")

    from phoenix.checkpoint import CheckpointError
    from phoenix.config import ConfigError
    from phoenix.convert import ConversionError

    try:
        if args.direction == "hf-to-phoenix":
            from phoenix.convert.hf_import import hf_to_phoenix

            out = hf_to_phoenix(args.hf_dir, args.out, tp=args.tp, pp=args.pp, ep=args.ep,
                                dtype=args.dtype,
                                progress=not args.no_progress)
        else:
            from phoenix.convert.hf_export import phoenix_to_hf

            out = phoenix_to_hf(args.checkpoint, args.out, dtype=args.dtype,
                                max_shard_bytes=int(args.max_shard_size_gb * 2**30),
                                progress=not args.no_progress)
    except (ConversionError, ConfigError, CheckpointError, OSError) as e:
        print(f"phoenix convert {args.direction}: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
