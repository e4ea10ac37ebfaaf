"""Needle in a haystack (passkey retrieval): prompts, scoring and the result table.

The pieces are pure and separate, so that the scoring can be proven with stub models:

1. :func:`build_needle_tasks` makes the prompts (token ids) from a tokenizer, filler
   tokens and a :class:`~phoenix.config.eval.NeedleConfig`.
2. :func:`score` runs a ``generate_fn`` (a batch of prompts -> generated token ids) over
   them and returns a :class:`NeedleResult`: the accuracy matrix, depth x length.
3. :mod:`phoenix.eval.needle_run` has the megatron greedy ``generate_fn`` and the
   collective evaluation of a model.

Prompt of one (length, depth, trial) cell, as token ids (each piece tokenised on its own
and the token lists spliced, so the needle's tokenisation never depends on its
neighbours)::

    filler[:p] + NEEDLE + filler[p:] + QUESTION          (then `new_tokens` are generated)

    NEEDLE   = "The pass key is 48291. Remember it. 48291 is the pass key."
    QUESTION = "What is the pass key? The pass key is"

* The filler is the haystack's token stream (document separators, EOD and BOS, dropped)
  from an offset drawn per trial, wrapped around when the haystack is short, cut so that
  ``len(prompt) + new_tokens == length`` exactly.
* ``p = round(depth * len(filler))``: the fraction ``depth`` of the filler is before the
  needle (0: the prompt starts with it; 1: it is right before the question).
* The passkey is a random ``digits``-digit number (no leading 0); the passkey and the
  offset come from a generator seeded by ``(seed, length, depth, trial)``, so the prompts
  are the same at every evaluation and every parallel layout.

Scoring: the generated tokens are decoded, the first run of digits in the text is the
answer, and a prompt is solved when it equals the passkey exactly (``"48291."`` and
``" 48291 is"`` are right; ``"4829"``, ``"482910"`` or no digits are wrong).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

from phoenix.config import ConfigError

NEEDLE_TEXT = "The pass key is {key}. Remember it. {key} is the pass key."
QUESTION_TEXT = "What is the pass key? The pass key is"

GenerateFn = Callable[[list[list[int]]], Sequence[Sequence[int]]]
"""A batch of prompts (token-id lists of one length) -> the generated ids of each."""


@dataclass(frozen=True)
class NeedleTask:
    """One prompt: ``input_ids`` (``length - new_tokens`` ids) and its answer."""

    input_ids: list[int]
    passkey: str
    length: int
    """The context length of the cell: prompt plus generated tokens."""
    depth: float
    trial: int
    needle_pos: int
    """Index in ``input_ids`` of the needle's first token (= filler tokens before it)."""
    needle_len: int
    filler_len: int


def default_lengths(seq_length: int) -> list[int]:
    """Powers of two from 1024 below ``seq_length``, and ``seq_length`` itself; just
    ``[seq_length]`` below 1024."""
    lengths, n = [], 1024
    while n < seq_length:
        lengths.append(n)
        n *= 2
    return [*lengths, seq_length]


def _rng(seed: int, length: int, depth: float, trial: int) -> np.random.Generator:
    return np.random.default_rng([seed, length, int(round(depth * 1_000_000)), trial])


def read_haystack(prefix: str, num_tokens: int, drop_ids: Sequence[int] = ()) -> np.ndarray:
    """Up to ``num_tokens`` filler tokens from the start of ``prefix``'s token stream
    (int64), without the ids in ``drop_ids`` (document separators). Raises DataError
    (naming the prefix) when nothing is left."""
    from phoenix.data.indexed import DataError, check_prefix, indexed_dataset_module

    check_prefix(prefix)
    dtype = indexed_dataset_module().IndexedDataset(prefix, mmap=True).index.dtype
    stream = np.memmap(prefix + ".bin", dtype=dtype, mode="r")
    out, pos, step = [], 0, max(num_tokens, 4096)
    have = 0
    while have < num_tokens and pos < len(stream):
        chunk = np.asarray(stream[pos:pos + step], dtype=np.int64)
        pos += step
        if len(drop_ids):
            chunk = chunk[~np.isin(chunk, np.asarray(drop_ids, dtype=np.int64))]
        out.append(chunk)
        have += len(chunk)
    tokens = np.concatenate(out)[:num_tokens] if out else np.empty(0, np.int64)
    if len(tokens) == 0:
        raise DataError(f"eval.needle.haystack_prefix '{prefix}': holds no filler tokens")
    return tokens


def haystack_tokens_needed(lengths: Sequence[int]) -> int:
    """Filler tokens worth reading: offsets of different trials then see different text."""
    return 4 * max(lengths)


def needle_prompt_parts(tokenizer, passkey: str) -> tuple[list[int], list[int]]:
    """The needle's and the question's token ids."""
    return (list(tokenizer.encode(NEEDLE_TEXT.format(key=passkey))),
            list(tokenizer.encode(QUESTION_TEXT)))


def build_needle_tasks(tokenizer, haystack_tokens, cfg, max_len: int) -> list[NeedleTask]:
    """Every (length, depth, trial) prompt, in that order (length-major).

    ``tokenizer``: has ``encode``; ``haystack_tokens``: 1-D filler ids (non-empty);
    ``cfg``: a :class:`~phoenix.config.eval.NeedleConfig` (lengths, depths, trials,
    digits, seed, new_tokens); ``max_len``: the current stage's sequence length, where
    the default lengths end (:func:`default_lengths`). Raises ConfigError naming
    ``eval.needle.lengths`` when a length is too short for the needle, the question and
    the answer.
    """
    lengths = cfg.lengths or default_lengths(max_len)
    hay = np.asarray(haystack_tokens, dtype=np.int64)
    if hay.ndim != 1 or len(hay) == 0:
        raise ValueError("build_needle_tasks: haystack_tokens must be a non-empty 1-D array")
    tasks = []
    for length in lengths:
        for depth in cfg.depths:
            for trial in range(cfg.trials):
                rng = _rng(cfg.seed, length, depth, trial)
                passkey = str(int(rng.integers(10 ** (cfg.digits - 1), 10 ** cfg.digits)))
                offset = int(rng.integers(0, len(hay)))
                needle, question = needle_prompt_parts(tokenizer, passkey)
                n_fill = length - cfg.new_tokens - len(needle) - len(question)
                if n_fill < 1:
                    raise ConfigError(
                        f"eval.needle.lengths: {length} tokens cannot hold the needle "
                        f"({len(needle)} tokens), the question ({len(question)}) and the "
                        f"answer ({cfg.new_tokens}) with any filler; use a longer length")
                filler = np.take(hay, np.arange(offset, offset + n_fill), mode="wrap").tolist()
                pos = int(round(depth * n_fill))
                ids = filler[:pos] + needle + filler[pos:] + question
                tasks.append(NeedleTask(ids, passkey, int(length), float(depth), trial, pos,
                                        len(needle), n_fill))
    return tasks


_DIGITS = re.compile(r"\d+")


def extract_answer(text: str) -> str | None:
    """The first run of ASCII digits in ``text`` (None: there is none)."""
    m = _DIGITS.search(text)
    return m.group(0) if m else None


@dataclass
class NeedleResult:
    """Accuracy of the needle eval: ``hits[i, j]`` of ``counts[i, j]`` prompts solved at
    ``depths[i]`` and ``lengths[j]``."""

    lengths: list[int]
    depths: list[float]
    hits: np.ndarray
    """int64 [depths, lengths]."""
    counts: np.ndarray
    """int64 [depths, lengths]."""
    answers: list[dict] = field(default_factory=list)
    """Per prompt scored in this process (every prompt after
    :meth:`NeedleEvaluator.evaluate <phoenix.eval.needle_run.NeedleEvaluator.evaluate>`):
    ``{"length", "depth", "trial", "passkey", "answer", "text", "hit"}``; ``answer`` is
    the number read from the generated ``text`` (None: no digits)."""

    @property
    def matrix(self) -> np.ndarray:
        """float [depths, lengths]: accuracy per cell (NaN for a cell without prompts)."""
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(self.counts > 0, self.hits / np.maximum(self.counts, 1), np.nan)

    def accuracy_by_length(self) -> dict[int, float]:
        h, c = self.hits.sum(axis=0), self.counts.sum(axis=0)
        return {n: (float(h[j] / c[j]) if c[j] else math.nan) for j, n in enumerate(self.lengths)}

    @property
    def mean(self) -> float:
        total = int(self.counts.sum())
        return float(self.hits.sum() / total) if total else math.nan

    def scalars(self) -> dict[str, float]:
        """The TensorBoard scalars, below ``eval/needle/``: ``<length>`` and ``mean``."""
        out = {str(n): acc for n, acc in self.accuracy_by_length().items()}
        out["mean"] = self.mean
        return out

    def to_dict(self) -> dict:
        return {"lengths": list(self.lengths), "depths": list(self.depths),
                "accuracy": [[None if math.isnan(v) else float(v) for v in row]
                             for row in self.matrix],
                "by_length": {str(k): v for k, v in self.accuracy_by_length().items()},
                "mean": self.mean, "hits": self.hits.tolist(), "counts": self.counts.tolist(),
                "prompts": list(self.answers)}

    @classmethod
    def from_dict(cls, data: dict) -> "NeedleResult":
        """The result of :meth:`to_dict` (without the per-prompt answers)."""
        return cls(list(data["lengths"]), list(data["depths"]),
                   np.asarray(data["hits"], dtype=np.int64),
                   np.asarray(data["counts"], dtype=np.int64))


def empty_result(lengths: Sequence[int], depths: Sequence[float]) -> NeedleResult:
    shape = (len(depths), len(lengths))
    return NeedleResult(list(lengths), list(depths), np.zeros(shape, np.int64),
                        np.zeros(shape, np.int64))


def score(tasks: Sequence[NeedleTask], generate_fn: GenerateFn, decode: Callable[[list[int]], str],
          *, batch_size: int = 1, lengths: Sequence[int] | None = None,
          depths: Sequence[float] | None = None) -> NeedleResult:
    """Run ``generate_fn`` on the prompts, ``batch_size`` at a time (a batch holds prompts
    of one length), and score each answer (``decode`` turns generated ids into text).

    ``lengths``/``depths``: the matrix's axes (default: those of ``tasks``, sorted), so
    that the results of disjoint task subsets (data-parallel ranks) add up cell by cell.
    """
    lengths = sorted({t.length for t in tasks}) if lengths is None else list(lengths)
    depths = sorted({t.depth for t in tasks}) if depths is None else list(depths)
    result = empty_result(lengths, depths)
    col = {n: j for j, n in enumerate(lengths)}
    row = {d: i for i, d in enumerate(depths)}
    by_length: dict[int, list[NeedleTask]] = {}
    for t in tasks:
        by_length.setdefault(t.length, []).append(t)
    for length, group in by_length.items():
        for k in range(0, len(group), batch_size):
            batch = group[k:k + batch_size]
            generated = generate_fn([list(t.input_ids) for t in batch])
            if len(generated) != len(batch):
                raise ValueError(f"generate_fn returned {len(generated)} answers for "
                                 f"{len(batch)} prompts")
            for t, ids in zip(batch, generated):
                text = decode([int(i) for i in ids])
                answer = extract_answer(text)
                i, j = row[t.depth], col[t.length]
                result.counts[i, j] += 1
                result.hits[i, j] += int(answer == t.passkey)
                result.answers.append({"length": t.length, "depth": t.depth, "trial": t.trial,
                                       "passkey": t.passkey, "answer": answer, "text": text,
                                       "hit": answer == t.passkey})
    return result


def format_needle_table(result: NeedleResult) -> str:
    """Accuracy per depth (rows) and length (columns), with the per-length and overall means."""
    width = max(7, *(len(str(n)) for n in result.lengths))
    lines = ["needle accuracy (depth x length)",
             f"{'depth':>6}  " + " ".join(f"{n:>{width}}" for n in result.lengths)]
    for i, d in enumerate(result.depths):
        cells = " ".join(f"{v:>{width}.3f}" for v in result.matrix[i])
        lines.append(f"{d:>6.2f}  {cells}")
    by_length = result.accuracy_by_length()
    lines.append(f"{'all':>6}  " + " ".join(f"{by_length[n]:>{width}.3f}" for n in result.lengths))
    lines.append(f"mean {result.mean:.4f} ({int(result.hits.sum())}/{int(result.counts.sum())})")
    return "\n".join(lines)
