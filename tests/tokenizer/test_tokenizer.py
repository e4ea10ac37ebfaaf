"""SentencePiece wrapper and trainer: special ids, lossless round trips, determinism."""

from __future__ import annotations

import gzip
import hashlib
import json
import pickle
from pathlib import Path

import pytest

from phoenix.data.synthetic import generate_documents, write_corpus
from phoenix.tokenizer import SentencePieceTokenizer, train_sentencepiece

VOCAB = 512


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "mixed.jsonl"
    with open(path, "w", encoding="utf-8") as f:
        for domain in ("web", "code", "math"):
            for rec in generate_documents(60, seed=3, domain=domain, max_words=80):
                f.write(json.dumps(rec) + "\n")
    return path


@pytest.fixture(scope="module")
def model(corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> str:
    out = tmp_path_factory.mktemp("tok") / "tok"
    return train_sentencepiece([corpus], out, VOCAB, text_key="text")


@pytest.fixture(scope="module")
def tok(model: str) -> SentencePieceTokenizer:
    return SentencePieceTokenizer(model)


def test_special_ids_and_vocab(tok: SentencePieceTokenizer, model: str) -> None:
    assert tok.vocab_size == VOCAB
    assert (tok.bos_id, tok.eod_id, tok.pad_id) == (1, 2, None)
    # The .vocab file lists every piece, one per line, with unk/bos/eos first.
    lines = Path(model).with_suffix(".vocab").read_text(encoding="utf-8").splitlines()
    assert len(lines) == VOCAB
    assert [ln.split("\t")[0] for ln in lines[:3]] == ["<unk>", "<s>", "</s>"]


@pytest.mark.parametrize(
    "text",
    [
        "The quick brown fox.",
        "  leading and  double  spaces ",
        "def f(x):\n    return x  # indented\n\ttab",
        "12 + 7 = 19.\n",
        "unicode: café, naïve, 中文, emoji 😀, zero-width \u200b",
        "\n\n",
    ],
)
def test_roundtrip_is_lossless(tok: SentencePieceTokenizer, text: str) -> None:
    ids = tok.encode(text)
    assert all(isinstance(i, int) and 0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == text
    # encode never adds specials by itself; callers append eod explicitly.
    assert tok.eod_id not in ids and tok.bos_id not in ids


def test_learned_merges_compress_corpus_text(tok: SentencePieceTokenizer) -> None:
    # A trained BPE must beat 1 token per byte on in-domain text, else training did nothing.
    text = next(generate_documents(1, seed=99, domain="web", min_words=100))["text"]
    assert len(tok.encode(text)) < 0.5 * len(text.encode("utf-8"))


def test_fingerprint_is_sha256_of_model_bytes(tok: SentencePieceTokenizer, model: str) -> None:
    assert tok.fingerprint == hashlib.sha256(Path(model).read_bytes()).hexdigest()


def test_training_is_deterministic_and_path_independent(
    corpus: Path, model: str, tmp_path: Path
) -> None:
    # Same data, different output location and input format (plain text vs jsonl.gz):
    # identical model bytes, because no paths are baked into the model.
    txt = tmp_path / "plain.txt.gz"
    with gzip.open(txt, "wt", encoding="utf-8") as f:
        for line in corpus.read_text(encoding="utf-8").splitlines():
            f.write(json.loads(line)["text"] + "\n")
    again = train_sentencepiece([txt], tmp_path / "sub" / "again", VOCAB)
    assert Path(again).read_bytes() == Path(model).read_bytes()
    vocab = Path(model).with_suffix(".vocab").read_bytes()
    assert Path(again).with_suffix(".vocab").read_bytes() == vocab
    # Only the two outputs are left behind: no temporary directories or files.
    assert sorted(p.name for p in (tmp_path / "sub").iterdir()) == ["again.model", "again.vocab"]
    other = train_sentencepiece([txt], tmp_path / "small", VOCAB - 64)
    assert SentencePieceTokenizer(other).fingerprint != SentencePieceTokenizer(again).fingerprint


def test_pickle_preserves_model(tok: SentencePieceTokenizer) -> None:
    clone = pickle.loads(pickle.dumps(tok))
    assert clone.fingerprint == tok.fingerprint
    assert clone.encode("hello 123") == tok.encode("hello 123")


def test_missing_model_names_path(tmp_path: Path) -> None:
    missing = tmp_path / "nope.model"
    with pytest.raises(FileNotFoundError, match="nope.model"):
        SentencePieceTokenizer(missing)


def test_missing_training_input_names_path(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="absent.txt"):
        train_sentencepiece([tmp_path / "absent.txt"], tmp_path / "tok", VOCAB)
    assert list(tmp_path.iterdir()) == []


def test_model_without_eos_has_no_eod(tmp_path: Path) -> None:
    corpus = write_corpus(tmp_path / "c.jsonl", 40, seed=1)
    path = train_sentencepiece(
        [corpus], tmp_path / "noeos", 300, text_key="text", extra_options={"eos_id": -1}
    )
    tok = SentencePieceTokenizer(path)
    with pytest.raises(ValueError, match="no EOS"):
        _ = tok.eod_id
    assert tok.decode(tok.encode("still works")) == "still works"
