"""Vocabulary expansion keeps every existing id (phoenix.tokenizer.expand_vocab) on a tiny
Llama-3-shaped byte-level BPE (specials after the learned vocabulary) and on a
sentencepiece model: old ids keep their tokens, text without new tokens encodes as
before, text with them uses them, and a tokenizer that moves an id is refused."""

from __future__ import annotations

import json
import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _docs(domain, n, seed=0):
    from phoenix.data.synthetic import generate_documents

    return [d["text"] for d in generate_documents(n, seed, domain=domain, max_words=80)]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    from phoenix.testing.hf_tiny import make_llama3_tokenizer

    return str(make_llama3_tokenizer(tmp_path_factory.mktemp("tok") / "base", _docs("web", 150), 384))


@pytest.fixture(scope="module")
def zh_words():
    from phoenix.data.synthetic import _ZH_WORDS

    return list(_ZH_WORDS[:50])


@pytest.fixture(scope="module")
def expanded(base, zh_words, tmp_path_factory):
    from phoenix.tokenizer.expand_vocab import expand_tokenizer

    out = tmp_path_factory.mktemp("exp") / "new"
    result = expand_tokenizer(base, zh_words + [" daily", "你好,", "<|eot_id|>"], out)
    return str(out), result


def test_old_ids_and_specials_keep_their_tokens(base, expanded):
    from phoenix.tokenizer import load_tokenizer

    out, result = expanded
    old, new = load_tokenizer(base), load_tokenizer(out)
    assert old.vocab_size == 392 and old.bos_id == 384  # 384 learned, 8 specials after them
    assert new.vocab_size == result.new_size == old.vocab_size + len(result.added)
    for i in range(old.vocab_size):
        assert new.id_to_token(i) == old.id_to_token(i)
    assert (new.bos_id, new.eod_id) == (old.bos_id, old.eod_id)
    assert new.backend.token_to_id("<|eot_id|>") == old.backend.token_to_id("<|eot_id|>") == 391
    assert min(i for i, _ in result.added) == 392  # after the specials
    assert result.unreachable == ["你好,"] and result.present == ["<|eot_id|>"]
    report = json.load(open(os.path.join(out, "vocab_expansion.json")))
    assert report["added"] == len(result.added) and report["old_vocab_size"] == 392


def test_text_without_new_tokens_encodes_identically(base, expanded):
    from phoenix.tokenizer import load_tokenizer

    old, new = load_tokenizer(base), load_tokenizer(expanded[0])
    for text in _docs("web", 40, seed=7) + _docs("code", 20) + _docs("math", 20):
        assert new.encode(text) == old.encode(text)


def test_text_with_new_tokens_uses_them(base, expanded, zh_words):
    from phoenix.tokenizer import load_tokenizer

    out, result = expanded
    old, new = load_tokenizer(base), load_tokenizer(out)
    ids = dict((s, i) for i, s in result.added)
    mid = new.encode("the news daily and the paper daily.")
    assert mid.count(ids[" daily"]) == 2  # a learned token: the leading space is its own
    for word in zh_words[:10]:
        assert new.encode(word)[1:] == [ids[word]], word
    text = "".join(_docs("zh", 5, seed=3))
    a, b = old.encode(text), new.encode(text)
    assert new.decode(b) == old.decode(a) and len(b) < len(a) / 2
    assert sum(i >= old.vocab_size for i in b) > len(b) / 3


def test_transformers_reads_the_expanded_tokenizer(expanded):
    from transformers import AutoTokenizer

    from phoenix.tokenizer import load_tokenizer

    out, _ = expanded
    auto, mine = AutoTokenizer.from_pretrained(out), load_tokenizer(out)
    assert len(auto) == mine.vocab_size
    for text in ["Hello daily news.", "".join(_docs("zh", 2, seed=5))]:
        assert auto(text)["input_ids"] == mine.encode(text)


def test_a_tokenizer_that_moves_an_id_is_refused(base, tmp_path):
    from phoenix.tokenizer import load_tokenizer
    from phoenix.tokenizer.expand_vocab import ExpansionError, check_extends

    # Appending to the BPE without entering the specials there: the tokenizers library
    # renumbers them on load (they would move above the new tokens).
    spec = json.load(open(os.path.join(base, "tokenizer.json")))
    spec["model"]["vocab"]["Ġdaily"] = 392
    spec["model"]["merges"].append(["Ġd", "aily"] if isinstance(spec["model"]["merges"][0], list)
                                   else "Ġd aily")
    spec["model"]["vocab"].setdefault("Ġd", 393)
    spec["model"]["vocab"].setdefault("aily", 394)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "tokenizer.json").write_text(json.dumps(spec))
    with pytest.raises(ExpansionError, match=r"changes existing id 384: '<\|begin_of_text\|>' ->"):
        check_extends(load_tokenizer(base), load_tokenizer(str(bad / "tokenizer.json")))


def test_sentencepiece_base_and_source(tiny_data, tmp_path):
    from phoenix.tokenizer import load_tokenizer, train_sentencepiece
    from phoenix.tokenizer.expand_vocab import expand_tokenizer, sentencepiece_surfaces

    zh = tmp_path / "zh.txt"
    zh.write_text("\n".join(_docs("zh", 200)))
    zh_model = train_sentencepiece([str(zh)], tmp_path / "zh", 400)
    surfaces = sentencepiece_surfaces(zh_model)
    assert surfaces and all("\u2581" not in s for s in surfaces)
    out = tmp_path / "sp_new"
    result = expand_tokenizer(tiny_data.tokenizer_model, surfaces, out)
    old, new = load_tokenizer(tiny_data.tokenizer_model), load_tokenizer(str(out / "tokenizer.model"))
    assert new.vocab_size == old.vocab_size + len(result.added) and result.added
    assert all(new.id_to_token(i) == old.id_to_token(i) for i in range(old.vocab_size))
    for text in _docs("web", 10):
        assert new.encode(text) == old.encode(text)
    text = "".join(_docs("zh", 3, seed=9))
    assert len(new.encode(text)) < len(old.encode(text)) and new.decode(new.encode(text)) == text


def test_refusals(base, tmp_path):
    from phoenix.tokenizer.expand_vocab import ExpansionError, expand_tokenizer

    with pytest.raises(ExpansionError, match="already exists"):
        expand_tokenizer(base, ["x"], base)
    wordpiece = tmp_path / "wp"
    wordpiece.mkdir()
    from tokenizers import Tokenizer, models

    Tokenizer(models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]")).save(str(wordpiece / "tokenizer.json"))
    with pytest.raises(ExpansionError, match="model type 'WordLevel'; only BPE"):
        expand_tokenizer(str(wordpiece), ["x"], tmp_path / "out")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".tmp-*"))


def test_word_start_forms():
    from phoenix.tokenizer.expand_vocab import with_word_starts

    assert with_word_starts(["quetzal", "你好", " daily", "42x", "quetzal", "été"]) == \
        ["quetzal", " quetzal", "你好", " daily", "42x", "été", " été"]


WORD, TEXT = "quetzalcoatl", "the quetzalcoatl flew over a quetzalcoatl nest."


@pytest.mark.parametrize("kind", ["bpe", "sentencepiece"])
def test_an_added_word_is_used_in_running_text(kind, base, tiny_data, tmp_path):
    """The word-start form makes a new word one token after a space; as given (the old
    behaviour), running text spends at least one more token per occurrence (e.g. the
    space, then the new token)."""
    from phoenix.tokenizer import load_tokenizer
    from phoenix.tokenizer.expand_vocab import expand_tokenizer, with_word_starts

    src = base if kind == "bpe" else tiny_data.tokenizer_model

    def expanded(surfaces, name):
        out = tmp_path / name
        result = expand_tokenizer(src, surfaces, out)
        new = load_tokenizer(str(out) if kind == "bpe" else str(out / "tokenizer.model"))
        return new, dict((s, i) for i, s in result.added)

    new, ids = expanded(with_word_starts([WORD]), "word_start")
    assert new.encode(TEXT).count(ids[" " + WORD]) == 2
    assert new.decode(new.encode(TEXT)).endswith(TEXT)  # after the BPE one's BOS
    given, _ = expanded([WORD], "as_given")
    assert len(given.encode(TEXT)) >= len(new.encode(TEXT)) + 2


def test_tokenizer_check_lists_texts_that_use_new_tokens(base, tmp_path, capsys):
    from phoenix.cli import main
    from phoenix.tokenizer.expand_vocab import expand_tokenizer, with_word_starts

    expand_tokenizer(base, with_word_starts([WORD]), tmp_path / "new")
    texts = [TEXT, "no new word here.", f"a {WORD}s flock", "plain text again."] * 4
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(texts) + "\n")
    new = str(tmp_path / "new" / "tokenizer.json")
    rc = main(["tokenizer", "check", str(os.path.join(base, "tokenizer.json")), new,
               "--corpus", str(corpus), "--list"])
    out = capsys.readouterr().out
    assert rc == 1
    listed = [line for line in out.splitlines() if line.strip().startswith("text ")]
    assert len(listed) == 8 and all(f"' {WORD}'" in line for line in listed)
    assert "8 of 16 texts are encoded differently" in out
    rc = main(["tokenizer", "check", str(os.path.join(base, "tokenizer.json")), new,
               "--corpus", str(corpus)])
    assert rc == 1 and len([ln for ln in capsys.readouterr().out.splitlines()
                            if ln.strip().startswith("text ")]) == 5
