"""Deterministic synthetic pretraining corpora (no downloads).

Documents come from a tiny probabilistic grammar over a few hundred made-up words, so a
small LM can learn them quickly: words have category suffixes (adjectives end in ``-ic``,
adverbs in ``-ly``, verbs in ``-s``), word choice is Zipfian and biased by a per-document
topic, and sentences follow a handful of templates. Three ``domain`` styles exist:

* ``web``:  English-like prose in paragraphs,
* ``code``: small python-like functions and classes,
* ``math``: arithmetic statements that are actually correct (``12 + 7 = 19.``),
* ``zh``:   Chinese-like prose: two- and three-character words of a fixed lexicon in
  sentences without spaces (for vocabulary-expansion and continual-pretraining tests).

Determinism: the output depends only on ``(num_docs, seed, domain, options)``; the word
lists are fixed (built from an internal constant seed), and ``.gz`` files are written with
a zero mtime so identical arguments give byte-identical files.
"""

from __future__ import annotations

import gzip
import json
import os
import random
from collections.abc import Iterator
from typing import Any

DOMAINS = ("web", "code", "math", "zh")

_FUNCTION_WORDS = ("the", "a", "of", "and", "in", "on", "with", "near", "under", "to")
_PREPS = ("in", "on", "with", "near", "under", "behind", "over")
_SYLLABLES = [c + v for c in "bdfgklmnprstvz" for v in "aeiou"] + ["tor", "len", "mar", "vis"]


def _make_words(rng: random.Random, n: int, suffix: str, syllables: tuple[int, int]) -> list[str]:
    words: list[str] = []
    seen: set[str] = set(_FUNCTION_WORDS)
    while len(words) < n:
        w = "".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(*syllables))) + suffix
        if w not in seen:
            seen.add(w)
            words.append(w)
    return words


# Fixed lexicon: independent of the user seed so every corpus shares one vocabulary.
_LEX_RNG = random.Random(20240611)
_NOUNS = _make_words(_LEX_RNG, 160, "", (2, 3))
_VERBS = _make_words(_LEX_RNG, 80, "s", (1, 2))
_ADJS = _make_words(_LEX_RNG, 60, "ic", (1, 2))
_ADVS = _make_words(_LEX_RNG, 20, "ly", (1, 2))
_NAMES = [w.capitalize() for w in _make_words(_LEX_RNG, 30, "o", (1, 2))]
_NUM_TOPICS = 16
_TOPIC_SIZE = 24


class _Topic:
    """A biased view of the lexicon: 80% of content words come from a small topic subset."""

    def __init__(self, index: int) -> None:
        r = random.Random(f"topic:{index}")
        self.nouns = r.sample(_NOUNS, _TOPIC_SIZE)
        self.verbs = r.sample(_VERBS, _TOPIC_SIZE // 2)
        self.adjs = r.sample(_ADJS, _TOPIC_SIZE // 2)

    @staticmethod
    def _zipf(rng: random.Random, words: list[str]) -> str:
        # Zipf weights make some words far more frequent: easy early wins for a tiny LM.
        return rng.choices(words, weights=[1.0 / (k + 1) for k in range(len(words))])[0]

    def pick(self, rng: random.Random, topical: list[str], everything: list[str]) -> str:
        return self._zipf(rng, topical if rng.random() < 0.8 else everything)

    def noun(self, rng: random.Random) -> str:
        return self.pick(rng, self.nouns, _NOUNS)

    def verb(self, rng: random.Random) -> str:
        return self.pick(rng, self.verbs, _VERBS)

    def adj(self, rng: random.Random) -> str:
        return self.pick(rng, self.adjs, _ADJS)

    def distinct_nouns(self, rng: random.Random, k: int) -> list[str]:
        # Code identifiers must differ (``def f(x, x)`` is not valid python).
        out: list[str] = []
        while len(out) < k:
            n = self.noun(rng)
            if n not in out:
                out.append(n)
        return out


_TOPICS = [_Topic(i) for i in range(_NUM_TOPICS)]


def _web_sentence(rng: random.Random, t: _Topic) -> str:
    name, adv, prep = rng.choice(_NAMES), rng.choice(_ADVS), rng.choice(_PREPS)
    n1, n2, v, a = t.noun(rng), t.noun(rng), t.verb(rng), t.adj(rng)
    s = rng.choice(
        [
            f"the {a} {n1} {v} the {n2}.",
            f"{name} {v} a {n1} {prep} the {n2}.",
            f"a {n1} {v} {adv}.",
            f"the {n1} of the {n2} is {a}.",
            f"{name} said that the {n1} {v} the {a} {n2}.",
            f"every {n1} {v} {adv} and the {n2} is {a}.",
        ]
    )
    return s[0].upper() + s[1:]


def _web_doc(rng: random.Random, t: _Topic, n_words: int) -> str:
    paragraphs: list[str] = []
    words = 0
    while words < n_words:
        para = " ".join(_web_sentence(rng, t) for _ in range(rng.randint(2, 5)))
        words += len(para.split())
        paragraphs.append(para)
    return "\n\n".join(paragraphs)


def _code_block(rng: random.Random, t: _Topic) -> str:
    a, b, c = t.distinct_nouns(rng, 3)
    fn, k, op = f"{t.verb(rng)}_{a}", rng.randint(1, 99), rng.choice("+-*")
    kind = rng.randrange(3)
    if kind == 0:
        return (
            f"def {fn}({a}, {b}):\n    {c} = {a} {op} {b}\n"
            f"    if {c} > {k}:\n        return {c}\n    return {a} * {k}\n"
        )
    if kind == 1:
        return (
            f"def {fn}({a}s):\n    total = 0\n    for {b} in {a}s:\n"
            f"        total += {b} {op} {k}\n    return total\n"
        )
    cls = a.capitalize()
    return (
        f"class {cls}:\n    def __init__(self, {b}):\n        self.{b} = {b}\n\n"
        f"    def {t.verb(rng)}(self):\n        return self.{b} {op} {k}\n"
    )


def _lines_doc(part, rng: random.Random, t: _Topic, n_words: int) -> str:
    """Newline-joined ``part(rng, t)`` pieces until the document holds ``n_words`` words."""
    pieces: list[str] = []
    words = 0
    while words < n_words:
        piece = part(rng, t)
        words += len(piece.split())
        pieces.append(piece)
    return "\n".join(pieces)


def _code_doc(rng: random.Random, t: _Topic, n_words: int) -> str:
    return _lines_doc(_code_block, rng, t, n_words)


def _math_sentence(rng: random.Random, t: _Topic) -> str:
    x, y = rng.randint(0, 50), rng.randint(0, 50)
    kind = rng.randrange(5)
    if kind == 0:
        return f"{x} + {y} = {x + y}."
    if kind == 1:
        x, y = max(x, y), min(x, y)
        return f"{x} - {y} = {x - y}."
    if kind == 2:
        x, y = x % 13, y % 13
        return f"{x} * {y} = {x * y}."
    if kind == 3:
        return f"The sum of {x} and {y} is {x + y}."
    name, noun = rng.choice(_NAMES), t.noun(rng)
    return f"If {name} has {x} {noun}s and gets {y} more, {name} has {x + y} {noun}s."


def _math_doc(rng: random.Random, t: _Topic, n_words: int) -> str:
    return _lines_doc(_math_sentence, rng, t, n_words)


_ZH_CHARS = ("的一是在人有我他这中大来上国个到说们为子和你地出道也时年得就那要下以生会自"
             "着去之过家学对可她里后小么心多天而能好都然没日于起还发成事只作当想看文无开手"
             "十用主行方又如前所本见经头面公同三已老从动两长知民样现分将外但身些与高意进把")
_ZH_RNG = random.Random(20240612)
_ZH_WORDS = sorted({"".join(_ZH_RNG.choice(_ZH_CHARS) for _ in range(_ZH_RNG.choice((2, 2, 3))))
                    for _ in range(240)})


def _zh_sentence(rng: random.Random, t: _Topic) -> str:
    words = [_Topic._zipf(rng, _ZH_WORDS) for _ in range(rng.randint(3, 8))]
    return "".join(words) + rng.choice("。，！？")


def _zh_doc(rng: random.Random, t: _Topic, n_words: int) -> str:
    # A "word" of the word count is one sentence-internal lexicon word.
    sentences, words = [], 0
    while words < n_words:
        sentence = _zh_sentence(rng, t)
        words += 5
        sentences.append(sentence)
    return "".join(sentences)


_GENERATORS = {"web": _web_doc, "code": _code_doc, "math": _math_doc, "zh": _zh_doc}


def generate_documents(
    num_docs: int,
    seed: int,
    *,
    group_key: str | None = None,
    docs_per_group: tuple[int, int] = (1, 8),
    min_words: int = 20,
    max_words: int = 200,
    domain: str = "web",
) -> Iterator[dict[str, Any]]:
    """Yield ``num_docs`` records ``{"id", "text", "domain"[, group_key]}``.

    Word counts are whitespace-separated words, drawn uniformly in ``[min_words, max_words]``
    (the last sentence may overshoot). With ``group_key``, consecutive documents share a
    group value (``"{domain}-{seed}-{g:06d}"``) and a topic; group sizes are uniform in
    ``docs_per_group`` (inclusive; the last group may be cut short by ``num_docs``).
    """
    if domain not in _GENERATORS:
        raise ValueError(f"domain must be one of {DOMAINS}, got {domain!r}")
    if num_docs < 0 or not 1 <= min_words <= max_words:
        raise ValueError("need num_docs >= 0 and 1 <= min_words <= max_words")
    lo, hi = docs_per_group
    if not 1 <= lo <= hi:
        raise ValueError(f"docs_per_group must satisfy 1 <= min <= max, got {docs_per_group}")
    if group_key in ("id", "text", "domain"):
        raise ValueError(f"group_key {group_key!r} collides with a built-in field")
    # String seeds are hashed with sha512 by `random`, so this is stable across runs.
    rng = random.Random(f"phoenix-synthetic:{domain}:{seed}")
    gen = _GENERATORS[domain]
    group, left_in_group, topic = -1, 0, _TOPICS[0]
    for i in range(num_docs):
        if left_in_group == 0:
            group, left_in_group = group + 1, rng.randint(lo, hi)
            topic = rng.choice(_TOPICS)
        if group_key is None:
            # Ungrouped documents each get their own topic.
            topic = rng.choice(_TOPICS)
        left_in_group -= 1
        record: dict[str, Any] = {
            "id": f"{domain}-{seed}-{i:08d}",
            "text": gen(rng, topic, rng.randint(min_words, max_words)),
            "domain": domain,
        }
        if group_key is not None:
            record[group_key] = f"{domain}-{seed}-{group:06d}"
        yield record


def write_corpus(
    path: str | os.PathLike[str],
    num_docs: int,
    seed: int,
    *,
    group_key: str | None = None,
    docs_per_group: tuple[int, int] = (1, 8),
    min_words: int = 20,
    max_words: int = 200,
    domain: str = "web",
) -> str:
    """Write a JSONL corpus (gzip if ``path`` ends in ``.gz``) and return ``path``.

    See :func:`generate_documents` for the record format. The file is written under a
    temporary name in the same directory and renamed into place when complete.
    """
    path = os.fspath(path)
    docs = generate_documents(
        num_docs,
        seed,
        group_key=group_key,
        docs_per_group=docs_per_group,
        min_words=min_words,
        max_words=max_words,
        domain=domain,
    )
    out_dir = os.path.dirname(os.path.abspath(path))
    os.makedirs(out_dir, exist_ok=True)
    tmp = os.path.join(out_dir, f".{os.path.basename(path)}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as raw:
            # mtime=0 and no embedded filename: byte-identical .gz for identical arguments.
            out: Any = raw
            if path.endswith(".gz"):
                out = gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0)
            with out:
                for record in docs:
                    out.write((json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8"))
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path
