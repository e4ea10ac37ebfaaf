"""``phoenix tokenizer check A B --corpus FILE``: do two tokenizers encode a corpus alike?

Each of A and B is a sentencepiece ``.model``, a Hugging Face ``tokenizer.json`` (both read
as phoenix reads them in training), or a folder, read with transformers' ``AutoTokenizer``
(what users of an exported model get; needs ``transformers``). Every text of the corpus
(one per line of a text file, or the ``--text-key`` of each line of a ``.jsonl``) is encoded
by both, special tokens (e.g. Llama-3's BOS) included. Exit status 0 when all agree, 1 with
the count and the first differences otherwise (``--list``: every differing text, with
the ids of B beyond A's vocabulary it uses, e.g. after ``phoenix expand-vocab``), 2 on a
usage error.

Example:
    phoenix tokenizer check run/tokenizer/tokenizer.json exported_hf/ --corpus sample.jsonl
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from phoenix.runtime.command import HelpFormatter


class _AutoTokenizer:
    """transformers' AutoTokenizer of a folder, encoding as ``tok(text)`` does."""

    def __init__(self, folder: str):
        from transformers import AutoTokenizer

        self._tok = AutoTokenizer.from_pretrained(folder)
        self.name = f"{folder} (AutoTokenizer {type(self._tok).__name__})"

    def encode(self, text: str) -> list[int]:
        return list(self._tok(text)["input_ids"])

    @property
    def vocab_size(self) -> int:
        return len(self._tok)

    def piece(self, tid: int) -> str:
        return repr(self._tok.convert_ids_to_tokens(tid))


class _Phoenix:
    def __init__(self, path: str):
        from phoenix.tokenizer import load_tokenizer

        self._tok = load_tokenizer(path)
        self.name = f"{path} ({type(self._tok).__name__})"

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text)

    @property
    def vocab_size(self) -> int:
        return self._tok.vocab_size

    def piece(self, tid: int) -> str:
        return repr(self._tok.decode([tid]))


def open_tokenizer(path: str):
    if os.path.isdir(path):
        return _AutoTokenizer(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"tokenizer not found: {path}")
    return _Phoenix(path)


def read_corpus(path: str, text_key: str) -> list[str]:
    texts = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if path.endswith(".jsonl"):
                if not line.strip():
                    continue
                try:
                    texts.append(json.loads(line)[text_key])
                except (ValueError, KeyError, TypeError):
                    raise ValueError(f"{path}:{n}: not a JSON object with key {text_key!r}") from None
            else:
                texts.append(line.rstrip("\n"))
    return texts


def compare(a, b, texts: list[str], shown: int = 5) -> tuple[int, list[str]]:
    """(number of texts encoded differently, descriptions of the first ``shown``; all of
    them when ``shown`` is None). A description names the first differing token and the
    tokens of B with ids beyond A's vocabulary (new tokens) that B's encoding uses."""
    count, lines = 0, []
    for i, text in enumerate(texts):
        x, y = a.encode(text), b.encode(text)
        if x == y:
            continue
        count += 1
        if shown is None or len(lines) < shown:
            k = next((j for j, (p, q) in enumerate(zip(x, y)) if p != q), min(len(x), len(y)))
            ta = f"{x[k]} {a.piece(x[k])}" if k < len(x) else "(end)"
            tb = f"{y[k]} {b.piece(y[k])}" if k < len(y) else "(end)"
            new = sorted({t for t in y if t >= a.vocab_size})
            uses = (f"; new tokens of B: {', '.join(f'{t} {b.piece(t)}' for t in new[:8])}"
                    if new else "")
            lines.append(f"text {i} {text[:60]!r}: {len(x)} vs {len(y)} tokens; first difference "
                         f"at token {k}: A {ta}, B {tb}{uses}")
    return count, lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(formatter_class=HelpFormatter,
                                prog="phoenix tokenizer", description=__doc__)
    sub = p.add_subparsers(dest="action", required=True)
    check = sub.add_parser("check", formatter_class=HelpFormatter,
                           help="do two tokenizers encode a corpus alike?")
    check.add_argument("a", help="a .model, a tokenizer.json, or a folder (AutoTokenizer)")
    check.add_argument("b", help="the same kinds as A")
    check.add_argument("--corpus", required=True, help="text file (one text a line) or .jsonl")
    check.add_argument("--text-key", default="text", help="JSON key of a .jsonl corpus")
    check.add_argument("--show", type=int, default=5, help="differences to print (default 5)")
    check.add_argument("--list", action="store_true",
                       help="print every text encoded differently (not only --show of them)")
    args = p.parse_args(argv)
    try:
        a, b = open_tokenizer(args.a), open_tokenizer(args.b)
        texts = read_corpus(args.corpus, args.text_key)
    except (OSError, ValueError, RuntimeError, ImportError) as e:
        print(f"phoenix tokenizer check: error: {e}", file=sys.stderr)
        return 2
    count, lines = compare(a, b, texts, None if args.list else args.show)
    print(f"A: {a.name}\nB: {b.name}")
    if count:
        print(f"{count} of {len(texts)} texts are encoded differently:")
        print("\n".join("  " + line for line in lines))
        return 1
    print(f"all {len(texts)} texts are encoded identically")
    return 0


if __name__ == "__main__":
    sys.exit(main())
