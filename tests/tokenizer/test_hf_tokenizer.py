"""The Hugging Face tokenizer backend on a tiny Llama-3-shaped tokenizer trained here with
the ``tokenizers`` library (byte-level BPE, special tokens appended after the learned
vocabulary, a TemplateProcessing post-processor that prepends BOS), and ``phoenix
tokenizer check`` against transformers' AutoTokenizer."""

from __future__ import annotations

import json
import os
import pickle

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

BOS, EOS = "<|begin_of_text|>", "<|end_of_text|>"
TEXTS = ["Hello world, this is phoenix.", "  two  spaces and\ttabs\n", "déjà vu 123456 !!",
         "def f(x):\n    return x ** 2", "The quick brown fox jumps over the lazy dog."]


def train_llama3_like(folder, *, bos_template: bool = True):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(ignore_merges=True))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(TEXTS * 20, trainer=trainer)
    tok.add_special_tokens([BOS, EOS])  # appended at the end, as Llama-3's 128000/128001
    if bos_template:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, tok.token_to_id(BOS))])
    os.makedirs(folder, exist_ok=True)
    tok.save(os.path.join(folder, "tokenizer.json"))
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump({"bos_token": BOS, "eos_token": EOS, "tokenizer_class": "PreTrainedTokenizerFast",
                   "model_max_length": 8192}, f)
    return folder


@pytest.fixture(scope="module")
def llama3_dir(tmp_path_factory):
    return train_llama3_like(str(tmp_path_factory.mktemp("tok") / "llama3"))


def test_llama3_conventions(llama3_dir):
    from phoenix.tokenizer import HFTokenizer, load_tokenizer

    tok = load_tokenizer(llama3_dir)
    assert isinstance(tok, HFTokenizer)
    n = tok.vocab_size
    assert (tok.bos_id, tok.eod_id, tok.pad_id) == (n - 2, n - 1, None)  # specials at the end
    for text in TEXTS:
        ids = tok.encode(text)
        assert ids[0] == tok.bos_id and tok.eod_id not in ids  # BOS by the post-processor
        assert all(0 <= i < n for i in ids)
        assert tok.decode(ids) == BOS + text                    # byte-level: lossless
    # The same file alone: BOS from the template, EOS from the well-known name.
    alone = load_tokenizer(os.path.join(llama3_dir, "tokenizer.json"))
    assert (alone.bos_id, alone.eod_id) == (tok.bos_id, tok.eod_id)
    assert alone.encode(TEXTS[0]) == tok.encode(TEXTS[0])


def test_pickles_and_fingerprints(llama3_dir, tmp_path):
    from phoenix.tokenizer import load_tokenizer

    tok = load_tokenizer(llama3_dir)
    again = pickle.loads(pickle.dumps(tok))
    assert again.fingerprint == tok.fingerprint and again.encode(TEXTS[2]) == tok.encode(TEXTS[2])
    assert load_tokenizer(llama3_dir).fingerprint == tok.fingerprint
    other = tmp_path / "other"
    other.mkdir()
    (other / "tokenizer.json").write_text(open(os.path.join(llama3_dir, "tokenizer.json")).read())
    (other / "tokenizer_config.json").write_text(json.dumps({"eos_token": BOS}))  # another EOD
    assert load_tokenizer(str(other)).fingerprint != tok.fingerprint


def test_config_selects_the_backend(llama3_dir, tiny_data):
    from phoenix.config import ConfigError, TokenizerConfig
    from phoenix.tokenizer import HFTokenizer, SentencePieceTokenizer, load_tokenizer

    assert isinstance(load_tokenizer(TokenizerConfig(hf_dir=llama3_dir)), HFTokenizer)
    json_file = os.path.join(llama3_dir, "tokenizer.json")
    assert isinstance(load_tokenizer(TokenizerConfig(model=json_file)), HFTokenizer)
    assert isinstance(load_tokenizer(TokenizerConfig(model=tiny_data.tokenizer_model)),
                      SentencePieceTokenizer)
    with pytest.raises(ConfigError, match="tokenizer.hf_dir: set together with tokenizer.model"):
        TokenizerConfig(model=json_file, hf_dir=llama3_dir)
    # Any other file is read as sentencepiece, which refuses a non-model file (the run's
    # input check turns that into a ConfigError naming tokenizer.model and the path:
    # tests/train/test_bad_input.py::test_unreadable_tokenizer_model).
    not_a_model = os.path.join(llama3_dir, "tokenizer_config.txt")
    with open(not_a_model, "w") as f:
        f.write("not a model")
    with pytest.raises(RuntimeError):
        load_tokenizer(TokenizerConfig(model=not_a_model))
    with pytest.raises(FileNotFoundError, match="tokenizer folder not found"):
        load_tokenizer(TokenizerConfig(hf_dir="/no/such/dir"))


def test_preprocess_with_a_tokenizer_json(llama3_dir, tmp_path):
    from phoenix.data.preprocess import preprocess
    from phoenix.tokenizer import load_tokenizer

    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    meta = preprocess([str(src)], str(tmp_path / "out"), llama3_dir)
    tok = load_tokenizer(llama3_dir)
    assert meta["tokenizer_fingerprint"] == tok.fingerprint and meta["eod_id"] == tok.eod_id
    expected = sum(len(tok.encode(t)) + 1 for t in TEXTS)  # BOS ... EOD per document
    assert meta["num_tokens"] == expected


def _check(a, b, corpus) -> tuple[int, str]:
    import contextlib
    import io

    from phoenix.cli import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = main(["tokenizer", "check", a, b, "--corpus", str(corpus)])
    return rc, out.getvalue()


def test_tokenizer_check_agrees_with_autotokenizer_and_catches_mismatches(llama3_dir, tmp_path):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS + ["new words here"]))
    json_file = os.path.join(llama3_dir, "tokenizer.json")
    rc, out = _check(json_file, llama3_dir, corpus)  # phoenix's backend vs transformers'
    assert rc == 0 and "all 6 texts are encoded identically" in out, out

    no_bos = train_llama3_like(str(tmp_path / "no_bos"), bos_template=False)
    rc, out = _check(json_file, os.path.join(no_bos, "tokenizer.json"), corpus)
    assert rc == 1 and "6 of 6 texts are encoded differently" in out, out
    assert "first difference at token 0" in out

    # the same vocabulary and merges, another pre-tokenizer (whitespace split first)
    from tokenizers import Tokenizer, pre_tokenizers

    split = Tokenizer.from_file(json_file)
    split.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.WhitespaceSplit(), pre_tokenizers.ByteLevel(add_prefix_space=False)])
    split.save(str(tmp_path / "split.json"))
    rc, out = _check(json_file, str(tmp_path / "split.json"), corpus)
    assert rc == 1 and "texts are encoded differently" in out, out

    rc, _ = _check(json_file, str(tmp_path / "missing.json"), corpus)
    assert rc == 2
