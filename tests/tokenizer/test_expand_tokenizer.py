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
