"""Bad inputs around a vocabulary change: ``checkpoint.init_from`` of a checkpoint built
for another vocabulary size is refused (also when padding gives both the same shape), and
a dataset tokenised with the old Hugging Face tokenizer is refused by a run that trains
with the expanded one (the .meta.json fingerprint check covers tokenizer.json files)."""

from __future__ import annotations

import json
import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _source(tmp_path, tiny_data, vocab_size):
    from phoenix.config import dump_config
    from phoenix.testing.tiny import tiny_config

    src = tmp_path / "src" / "checkpoints" / "step_000004"
    src.mkdir(parents=True)
    cfg = tiny_config(tiny_data, tmp_path / "src", model={"preset": "tiny", "vocab_size": vocab_size})
    (src / "config.yaml").write_text(dump_config(cfg))
    return src


def test_init_from_another_vocabulary_is_refused(tiny_data, tmp_path):
    from phoenix.checkpoint.checkpointer import check_init_vocab
    from phoenix.config import ConfigError
    from phoenix.testing.tiny import tiny_config

    run = tiny_config(tiny_data, tmp_path / "run")  # the tokenizer's 512 tokens
    # 500 and 512 both pad to 512 rows: the shapes agree, the token ids do not.
    with pytest.raises(ConfigError, match=r"checkpoint.init_from: .*step_000004 was trained with a "
                                          r"vocabulary of 500 tokens, this run's model has 512 "
                                          r".*grow it with phoenix expand-vocab"):
        check_init_vocab(_source(tmp_path / "a", tiny_data, 500), run)
    with pytest.raises(ConfigError, match="a vocabulary cannot shrink"):
        check_init_vocab(_source(tmp_path / "b", tiny_data, 600), run)
    check_init_vocab(_source(tmp_path / "c", tiny_data, 512), run)  # the same: accepted


def test_data_of_the_old_hf_tokenizer_is_refused(tiny_data, tmp_path):
    from phoenix.config import ConfigError
    from phoenix.data.preprocess import preprocess
    from phoenix.testing.hf_tiny import make_llama3_tokenizer
    from phoenix.data.synthetic import generate_documents
    from phoenix.config import build_config
    from phoenix.testing.tiny import tiny_config_dict
    from phoenix.tokenizer.expand_vocab import expand_tokenizer
    from phoenix.train.trainer import check_inputs

    docs = [d["text"] for d in generate_documents(60, 0, domain="web", max_words=60)]
    base = make_llama3_tokenizer(tmp_path / "base", docs, 300)
    new = tmp_path / "new"
    result = expand_tokenizer(base, ["你好", " daily"], new)
    src = tmp_path / "web.jsonl"
    src.write_text("".join(json.dumps({"text": t}) + "\n" for t in docs))
    for name, tok in (("old", base), ("new", new)):
        preprocess([str(src)], str(tmp_path / name), str(tok))
    def config(prefix):
        d = tiny_config_dict(tiny_data, tmp_path / "run",
                             data={"datasets": [{"prefix": str(tmp_path / prefix), "name": "web"}]})
        d["tokenizer"] = {"hf_dir": str(new)}
        return build_config(d)

    assert check_inputs(config("new")).vocab_size == result.new_size > result.old_size
    with pytest.raises(ConfigError, match=r"data.datasets\[0\]: .*old' was tokenised with a different "
                                          r"tokenizer than tokenizer.hf_dir .*new \(fingerprints differ\)"):
        check_inputs(config("old"))
