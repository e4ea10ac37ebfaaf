"""``phoenix expand-vocab``: grow a tokenizer's vocabulary without changing any existing id,
and optionally resize a checkpoint to it.

    phoenix expand-vocab BASE (--tokens FILE | --sp-model ZH.model | --tokenizer NEW) --out OUT
                         [--checkpoint CKPT]

BASE is the tokenizer the checkpoint was trained with: an HF folder or tokenizer.json
(byte-level BPE, e.g. Llama-3) or a sentencepiece .model. New tokens come from a text file
(one a line; "▁" stands for a space; a word also gets its word-start form " word", the
one running text uses, unless --as-given) or from the normal pieces of a sentencepiece model
trained on the new language; --tokenizer takes an already expanded tokenizer instead
(checked: it must keep every id). New ids follow the largest id in use (for Llama-3, after
the specials 128000-128255).

Without --checkpoint, OUT is the expanded tokenizer folder (+ vocab_expansion.json). With
it, OUT is a phoenix folder: OUT/checkpoints (weights only, new rows = mean of the old
sub-token rows), OUT/tokenizer, OUT/model.yaml and OUT/vocab_expansion.json; train from it
with checkpoint.init_from: OUT, model.preset: OUT/model.yaml, tokenizer.hf_dir:
OUT/tokenizer (or tokenizer.model: OUT/tokenizer/tokenizer.model).

Texts that hold pieces of a new token (e.g. a longer word that starts with it) may encode
differently after the expansion, since the new token's merges (byte-level BPE) or piece
(sentencepiece) apply there too; text without any of them encodes exactly as before.
List them with: phoenix tokenizer check BASE OUT --corpus SAMPLE --list

OUT is written atomically (a temporary folder renamed when complete). Errors: one line,
exit status 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from phoenix.runtime.command import HelpFormatter


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(formatter_class=HelpFormatter,
                                prog="phoenix expand-vocab", description=__doc__)
    p.add_argument("base", help="the tokenizer to expand (HF folder, tokenizer.json or .model)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--tokens", help="text file: one new token a line")
    src.add_argument("--sp-model", help="sentencepiece model whose pieces are the new tokens")
    src.add_argument("--tokenizer", help="an already expanded tokenizer (checked, then used)")
    p.add_argument("--as-given", action="store_true",
                   help="with --tokens: add each token only as written (by default a word "
                        "also gets its word-start form ' word', which running text uses)")
    p.add_argument("--out", required=True, help="the new folder to write")
    p.add_argument("--checkpoint", help="resize this checkpoint (a checkpoint, run or import folder)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")

    from phoenix.checkpoint import CheckpointError
    from phoenix.config import ConfigError
    from phoenix.convert import ConversionError
    from phoenix.tokenizer.expand_vocab import (
        ExpansionError,
        expand_tokenizer,
        read_token_list,
        sentencepiece_surfaces,
        with_word_starts,
    )

    try:
        surfaces = None
        if args.tokens:
            surfaces = read_token_list(args.tokens)
            if not args.as_given:
                surfaces = with_word_starts(surfaces)
        elif args.sp_model:
            surfaces = sentencepiece_surfaces(args.sp_model)
        if args.checkpoint:
            from phoenix.convert.expand_vocab import expand_checkpoint

            info = expand_checkpoint(args.checkpoint, args.base, args.out, surfaces=surfaces,
                                     tokenizer=args.tokenizer)
            print(f"wrote {args.out}: vocabulary {info['old_vocab_size']} -> "
                  f"{info['new_vocab_size']} (padded {info['padded_vocab_size']})")
            print(json.dumps(info["use"]))
            return 0
        if surfaces is None:
            raise ExpansionError("--tokenizer needs --checkpoint (to check a tokenizer alone, "
                                 "use it with --checkpoint or phoenix tokenizer check)")
        result = expand_tokenizer(args.base, surfaces, args.out)
    except (ExpansionError, ConversionError, ConfigError, CheckpointError, OSError) as e:
        print(f"phoenix expand-vocab: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}: vocabulary {result.old_size} -> {result.new_size} "
          f"({len(result.added)} tokens appended, {len(result.intermediate)} of them "
          f"intermediate; {len(result.present)} already present, {len(result.unreachable)} "
          f"unreachable)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
