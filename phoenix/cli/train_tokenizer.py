r"""``phoenix train-tokenizer``: train a byte-fallback SentencePiece tokenizer
(unk=0, bos=1, eos=2, no pad).

Example:
    phoenix train-tokenizer --input data/web.jsonl.gz --text-key text \
        --model-prefix data/tok --vocab-size 8192
"""

from __future__ import annotations

import argparse
import sys

from phoenix.tokenizer import SentencePieceTokenizer, train_sentencepiece
from phoenix.runtime.command import HelpFormatter


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(formatter_class=HelpFormatter,
        prog="phoenix train-tokenizer", description=__doc__,
    )
    p.add_argument("--input", nargs="+", required=True, help="text files, or JSONL with --text-key")
    p.add_argument("--model-prefix", required=True, help="writes PREFIX.model and PREFIX.vocab")
    p.add_argument("--vocab-size", type=int, required=True)
    p.add_argument("--model-type", default="bpe", choices=["bpe", "unigram", "char", "word"])
    p.add_argument("--text-key", default=None, help="treat inputs as JSONL and read this key")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1,
                   help="trainer threads (recorded in the model, so it changes the fingerprint)")
    p.add_argument("--input-sentence-size", type=int, default=0,
                   help="train on a seeded sample of this many lines (0: all)")
    args = p.parse_args(argv)
    try:
        model = train_sentencepiece(
            args.input,
            args.model_prefix,
            args.vocab_size,
            args.model_type,
            text_key=args.text_key,
            seed=args.seed,
            threads=args.threads,
            input_sentence_size=args.input_sentence_size,
        )
    except (OSError, ValueError, RuntimeError) as e:
        print(f"phoenix train-tokenizer: error: {e}", file=sys.stderr)
        return 2
    tok = SentencePieceTokenizer(model)
    print(f"{model}: vocab_size={tok.vocab_size} fingerprint={tok.fingerprint}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
