"""Vocabulary expansion that keeps every existing id: new tokens are appended after the
largest id in use (for Llama-3, after the specials 128000-128255).

* Byte-level BPE ``tokenizer.json`` (Llama-3, Qwen2, GPT-2 style): each new token is
  appended to the BPE ``model.vocab`` together with the merges that build it, as a
  learned token would be, never with ``add_tokens()`` (whose verbatim added tokens are
  matched before pre-tokenization and break the leading-space handling: mid-sentence
  ``" word"`` would become ``"Ġ" + "word"``). Tokens are processed shortest first; the
  merges of a token combine its segmentation by the tokenizer built so far, left to right,
  and an intermediate string that is not yet a token is appended too (reported as such).
  New merges rank after every existing one, so text that contains no new token encodes as
  before. A token the pre-tokenizer would split (``"你好,"``, ``"a b"``) could never be
  produced and is skipped, as is one that already is a single token.
* SentencePiece ``.model``: pieces are appended to the model proto as NORMAL pieces: with
  score 0 in a unigram model (as Chinese-LLaMA merged its Chinese pieces into LLaMA's), as
  a chain of pieces scored below every existing one in a BPE model (see
  :func:`expand_sentencepiece`).

The tokenizers library gives added (special) tokens the ids after the BPE vocabulary's
size when it loads a tokenizer.json, whatever the file says; the specials are therefore
also entered in the BPE vocabulary at their own ids (see ``_expand_bpe_json``).

Surface forms are text; in a token list file (one token a line) and in sentencepiece
pieces, ``"▁"`` (U+2581) stands for a space, so ``▁daily`` is the token ``" daily"``.
:func:`check_extends` refuses a tokenizer that changes an existing id.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from phoenix.io import atomic_output_dir

SPACE = "\u2581"
# Files of an HF tokenizer folder that stay valid after the expansion (vocab.json /
# merges.txt / tokenizer.model of the slow tokenizer would not: they are not copied).
_KEPT_FILES = ("tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
               "chat_template.json")
REPORT = "vocab_expansion.json"


class ExpansionError(ValueError):
    """The expansion cannot be done without changing an existing id, or the input is not
    supported; the message names the token, id or file."""


@dataclass
class Expansion:
    """What an expansion did."""

    kind: str
    """``hf`` (tokenizer.json) or ``sentencepiece``."""
    old_size: int
    new_size: int
    added: list[tuple[int, str]] = field(default_factory=list)
    """(new id, surface text) of every appended token, intermediates included."""
    intermediate: list[str] = field(default_factory=list)
    """Surfaces appended only as steps towards a longer requested token."""
    present: list[str] = field(default_factory=list)
    """Requested tokens that already were a single token (nothing appended)."""
    unreachable: list[str] = field(default_factory=list)
    """Requested tokens the pre-tokenizer splits: they could never be produced."""

    def to_dict(self) -> dict:
        return {"kind": self.kind, "old_vocab_size": self.old_size, "new_vocab_size": self.new_size,
                "added": len(self.added), "intermediate": len(self.intermediate),
                "already_present": len(self.present), "unreachable": len(self.unreachable),
                "first_added": [{"id": i, "text": s} for i, s in self.added[:20]],
                "unreachable_examples": self.unreachable[:20]}


# ------------------------------------------------------------------- new token sources


def read_token_list(path: str | os.PathLike) -> list[str]:
    """Tokens of a text file, one a line (``▁`` = space; empty lines skipped, order kept,
    duplicates dropped)."""
    out: dict[str, None] = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            text = line.rstrip("\r\n").replace(SPACE, " ")
            if text:
                out.setdefault(text, None)
    return list(out)


def sentencepiece_surfaces(model_file: str | os.PathLike) -> list[str]:
    """Surface texts of the normal pieces of a sentencepiece model (e.g. one trained on
    Chinese text), in id order: control, unknown, byte and unused pieces are left out."""
    import sentencepiece as spm

    if not os.path.isfile(model_file):
        raise FileNotFoundError(f"sentencepiece model not found: {model_file}")
    sp = spm.SentencePieceProcessor(model_file=os.fspath(model_file))
    out: dict[str, None] = {}
    for i in range(sp.get_piece_size()):
        if sp.is_control(i) or sp.is_unknown(i) or sp.is_byte(i) or sp.is_unused(i):
            continue
        text = sp.id_to_piece(i).replace(SPACE, " ")
        if text:
            out.setdefault(text, None)
    return list(out)


def with_word_starts(surfaces: list[str]) -> list[str]:
    """``surfaces`` with the word-start form (a leading space) added after each word: a
    surface that begins with a letter of a script that separates words with spaces
    (below U+2E80, where the CJK blocks start). In running text such a word follows a
    space, and both tokenizer kinds fold that space into the word's token (byte-level
    BPE's pre-tokenizer makes ``" word"`` one unit; sentencepiece writes ``"▁word"``), so
    without this form an added ``"word"`` is used only inside other words or at the very
    start of a text. CJK text has no spaces: its words are taken as they are."""
    out: dict[str, None] = {}
    for surface in surfaces:
        out.setdefault(surface, None)
        if surface[:1].isalpha() and ord(surface[0]) < 0x2E80:
            out.setdefault(" " + surface, None)
    return list(out)


# ------------------------------------------------------------------- byte-level BPE


def _is_byte_level(spec) -> bool:
    if not isinstance(spec, dict):
        return False
    if spec.get("type") == "ByteLevel":
        return True
    return any(_is_byte_level(p) for p in spec.get("pretokenizers") or [])


def _bpe(word: str, ranks: dict[tuple[str, str], int]) -> list[str]:
    """BPE of one pre-tokenized word: merge the lowest-ranked adjacent pair (leftmost on
    a tie) until none applies, as the ``tokenizers`` BPE model does."""
    syms = list(word)
    while len(syms) > 1:
        best, at = None, -1
        for i in range(len(syms) - 1):
            r = ranks.get((syms[i], syms[i + 1]))
            if r is not None and (best is None or r < best):
                best, at = r, i
        if best is None:
            break
        syms[at:at + 2] = [syms[at] + syms[at + 1]]
    return syms


def _expand_bpe_json(spec: dict, backend, surfaces: list[str], where: str) -> Expansion:
    """Append ``surfaces`` to the BPE of the tokenizer.json ``spec`` (changed in place)."""
    model = spec.get("model") or {}
    if model.get("type") != "BPE":
        raise ExpansionError(f"{where}: model type {model.get('type')!r}; only BPE tokenizer.json "
                             f"files expand (for a sentencepiece tokenizer give its .model)")
    if not _is_byte_level(spec.get("pre_tokenizer")):
        raise ExpansionError(f"{where}: not a byte-level BPE (no ByteLevel pre-tokenizer); only "
                             f"byte-level BPE tokenizer.json files (Llama-3, Qwen2, GPT-2) expand")
    for key in ("dropout", "continuing_subword_prefix", "end_of_word_suffix"):
        if model.get(key):
            raise ExpansionError(f"{where}: BPE {key}={model[key]!r} is not supported")
    vocab: dict[str, int] = model["vocab"]
    merges = model["merges"]
    as_strings = bool(merges) and isinstance(merges[0], str)
    ranks = {tuple(m.split(" ", 1) if as_strings else m): r for r, m in enumerate(merges)}
    added_ids = {t["id"] for t in spec.get("added_tokens") or []}
    added_contents = {t["content"] for t in spec.get("added_tokens") or []}
    next_id = max([*vocab.values(), *added_ids, -1]) + 1
    old_size = next_id
    result = Expansion("hf", old_size, old_size)
    pre = backend.pre_tokenizer
    norm = backend.normalizer

    def append(piece: str, surface: str) -> None:
        nonlocal next_id
        vocab[piece] = next_id
        result.added.append((next_id, surface))
        next_id += 1

    # The characters of the requested tokens first (so that words are merged from whole
    # characters: "你" before "你好"), then the tokens shortest first (a longer one is
    # built from the shorter new ones).
    requested = set(surfaces)
    chars = {c: None for s in surfaces if len(s) > 1 for c in s if c not in requested}
    for surface in [*chars, *sorted(surfaces, key=len)]:
        wanted = surface in requested
        if surface in added_contents:
            if wanted:
                result.present.append(surface)
            continue
        text = norm.normalize_str(surface) if norm is not None else surface
        words = pre.pre_tokenize_str(text) if pre is not None else [(text, None)]
        if len(words) != 1:
            if wanted:
                result.unreachable.append(surface)
            continue
        word = words[0][0]
        if word in vocab:
            if wanted:
                result.present.append(surface)
            continue
        pieces = _bpe(word, ranks)
        missing = [c for c in pieces if c not in vocab]
        if missing:
            raise ExpansionError(f"{where}: token {surface!r}: symbol(s) {missing[:3]} are not in "
                                 f"the vocabulary (not a byte-level alphabet)")
        acc = pieces[0]
        for k, nxt in enumerate(pieces[1:], 1):
            pair = (acc, nxt)
            acc = acc + nxt
            if pair not in ranks:
                ranks[pair] = len(merges)
                merges.append(f"{pair[0]} {pair[1]}" if as_strings else list(pair))
            if acc not in vocab:
                last = k == len(pieces) - 1
                append(acc, surface if last else _surface_of(backend, pieces[:k + 1]))
                if not (last and wanted):
                    result.intermediate.append(result.added[-1][1])
    if result.added:
        # The tokenizers library numbers the added (special) tokens from the BPE vocabulary's
        # size when it loads a file, whatever ids the file gives them: with new entries
        # above them, Llama-3's specials would move. Entered in the BPE vocabulary at their
        # own ids, they keep them (and stay added tokens, matched before the BPE).
        for token in spec.get("added_tokens") or []:
            if vocab.setdefault(token["content"], token["id"]) != token["id"]:
                raise ExpansionError(f"{where}: added token {token['content']!r} has id "
                                     f"{token['id']} but the BPE vocabulary gives it "
                                     f"{vocab[token['content']]}")
        if len(set(vocab.values())) != len(vocab) or len(vocab) != next_id:
            raise ExpansionError(f"{where}: the ids of the vocabulary and the added tokens are "
                                 f"not 0..{next_id - 1} without gaps or repeats; not supported")
    result.new_size = next_id
    return result


def _surface_of(backend, pieces: list[str]) -> str:
    """Text of a byte-level token string (decoded through the tokenizer's decoder)."""
    return backend.decoder.decode(["".join(pieces)]) if backend.decoder is not None else "".join(pieces)


def expand_hf(base_dir: str | os.PathLike, surfaces: list[str], out_dir: Path) -> Expansion:
    """Write into ``out_dir`` (existing, empty) the expanded tokenizer.json of the HF
    tokenizer ``base_dir`` (a folder, or a tokenizer.json) and its kept companion files."""
    from tokenizers import Tokenizer

    base = Path(base_dir)
    file = base / "tokenizer.json" if base.is_dir() else base
    if not file.is_file():
        raise FileNotFoundError(f"tokenizer.json not found: {file}")
    spec = json.loads(file.read_text(encoding="utf-8"))
    backend = Tokenizer.from_file(str(file))
    result = _expand_bpe_json(spec, backend, surfaces, str(file))
    (out_dir / "tokenizer.json").write_text(json.dumps(spec, ensure_ascii=False, indent=2),
                                            encoding="utf-8")
    for name in _KEPT_FILES:
        if (file.parent / name).is_file():
            shutil.copyfile(file.parent / name, out_dir / name)
    new = Tokenizer.from_file(str(out_dir / "tokenizer.json"))
    for tid, surface in result.added:  # the BPE turns every appended string into its token
        ids = [t.id for t in new.model.tokenize(new.id_to_token(tid))]
        if ids != [tid]:
            raise ExpansionError(f"{file}: token {surface!r} (new id {tid}) encodes as {ids} after "
                                 f"the expansion (a merge conflict); leave it out")
    return result


# ------------------------------------------------------------------- sentencepiece


def _sp_bpe(unit: str, scores: dict[str, float]) -> list[str]:
    """sentencepiece's BPE of one whitespace unit (``"▁word"``): from its characters,
    merge the adjacent pair whose concatenation is a piece of the highest score (leftmost
    on a tie) until none is."""
    syms = list(unit)
    while len(syms) > 1:
        best, at = None, -1
        for i in range(len(syms) - 1):
            score = scores.get(syms[i] + syms[i + 1])
            if score is not None and (best is None or score > best):
                best, at = score, i
        if best is None:
            break
        syms[at:at + 2] = [syms[at] + syms[at + 1]]
    return syms


def expand_sentencepiece(model_file: str | os.PathLike, surfaces: list[str],
                         out_dir: Path) -> Expansion:
    """Write ``out_dir/tokenizer.model``: the sentencepiece model with ``surfaces`` appended
    as NORMAL pieces (needs ``protobuf``).

    Unigram models: each piece with score 0, the most likely a piece can be, so text
    holding it uses it (Chinese-LLaMA's merge). BPE models (phoenix's own, LLaMA-1/2):
    sentencepiece's BPE joins two adjacent symbols into a piece, highest score first, so a
    new piece is reachable only through a chain of pieces; as for byte-level BPE, the
    surface's segmentation by the model built so far is joined left to right, each
    intermediate appended too, with scores below every existing piece (in order), so the
    new pieces form only after every existing merge: text that holds none of their
    pieces encodes as before."""
    from sentencepiece import sentencepiece_model_pb2 as pb

    proto = pb.ModelProto()
    proto.ParseFromString(Path(model_file).read_bytes())
    normal = pb.ModelProto.SentencePiece.NORMAL
    existing = {p.piece for p in proto.pieces}
    result = Expansion("sentencepiece", len(proto.pieces), len(proto.pieces))
    bpe = proto.trainer_spec.model_type == pb.TrainerSpec.BPE
    scores = {p.piece: p.score for p in proto.pieces if p.type == normal}
    lowest = min(scores.values(), default=0.0)

    def append(piece: str, surface: str) -> None:
        new = proto.pieces.add()
        score = lowest - 1.0 - len(result.added) if bpe else 0.0
        new.piece, new.score, new.type = piece, score, normal
        existing.add(piece)
        scores[piece] = score
        result.added.append((len(proto.pieces) - 1, surface))

    for surface in (sorted(surfaces, key=len) if bpe else surfaces):
        piece = surface.replace(" ", SPACE)
        if piece in existing:
            result.present.append(surface)
            continue
        chain = _sp_bpe(piece, scores) if bpe else [piece]
        acc = chain[0]
        for nxt in chain[1:]:
            acc += nxt
            if acc not in existing:
                append(acc, acc.replace(SPACE, " "))
                if acc != piece:
                    result.intermediate.append(result.added[-1][1])
        if piece not in existing:  # one character (or a unigram piece)
            append(piece, surface)
    result.new_size = len(proto.pieces)
    (out_dir / "tokenizer.model").write_bytes(proto.SerializeToString())
    return result


# ------------------------------------------------------------------- checks and entry


def check_extends(old, new) -> None:
    """Raise ExpansionError, naming the first one, unless every id of ``old`` has the same
    token in ``new`` and BOS / EOD / PAD keep their ids (phoenix tokenizers)."""
    if new.vocab_size < old.vocab_size:
        raise ExpansionError(f"{new.model_file}: has {new.vocab_size} tokens, fewer than the "
                             f"{old.vocab_size} of {old.model_file}")
    for i in range(old.vocab_size):
        a, b = old.id_to_token(i), new.id_to_token(i)
        if a != b:
            raise ExpansionError(f"{new.model_file} changes existing id {i}: {a!r} -> {b!r} (an "
                                 f"expansion may only append tokens)")
    for what in ("bos_id", "eod_id", "pad_id"):
        try:
            a, b = getattr(old, what), getattr(new, what)
        except ValueError:
            continue
        if a != b:
            raise ExpansionError(f"{new.model_file}: {what} {a} -> {b} (special tokens keep their ids)")


def expand_tokenizer(base: str | os.PathLike, surfaces: list[str],
                     out: str | os.PathLike) -> Expansion:
    """Expand the tokenizer ``base`` (HF folder / tokenizer.json, or a sentencepiece
    ``.model``) by ``surfaces`` into the new folder ``out`` (atomically: written as a
    temporary folder and renamed); checked with :func:`check_extends`."""
    from phoenix.tokenizer import load_tokenizer

    with atomic_output_dir(out, ExpansionError) as tmp:
        old = load_tokenizer(base)
        if str(base).endswith(".model"):
            result = expand_sentencepiece(base, surfaces, tmp)
            new_file = tmp / "tokenizer.model"
        else:
            result = expand_hf(base, surfaces, tmp)
            new_file = tmp
        if result.old_size != old.vocab_size:
            raise ExpansionError(f"{base}: ids are not contiguous ({old.vocab_size} tokens, largest "
                                 f"id {result.old_size - 1}); not supported")
        check_extends(old, load_tokenizer(new_file))
        (tmp / REPORT).write_text(json.dumps(result.to_dict(), ensure_ascii=False, indent=2) + "\n",
                                  encoding="utf-8")
    return result
