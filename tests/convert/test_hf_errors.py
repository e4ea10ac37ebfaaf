"""What ``phoenix convert`` refuses, by name, before writing anything (and that a failure
late in a conversion leaves no partial output)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from phoenix.convert import ConversionError  # noqa: E402


@pytest.fixture(scope="module")
def sharded_llama(tmp_path_factory) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                         num_hidden_layers=2, intermediate_size=48, vocab_size=200,
                         max_position_embeddings=64, tie_word_embeddings=False)
    path = tmp_path_factory.mktemp("hf") / "llama"
    LlamaForCausalLM(config).save_pretrained(path, max_shard_size="30KB")
    return path


@pytest.fixture
def llama(sharded_llama, tmp_path) -> Path:
    copy = tmp_path / "llama"
    shutil.copytree(sharded_llama, copy)
    return copy


def edit_config(folder: Path, **changes) -> None:
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))


def convert(folder: Path, out: Path, **kw):
    from phoenix.convert.hf_import import hf_to_phoenix

    return hf_to_phoenix(folder, out, progress=False, **kw)


@pytest.mark.parametrize("changes,message", [
    ({"architectures": ["GPT2LMHeadModel"]}, r"architectures \['GPT2LMHeadModel'\]: not supported"),
    ({"attention_bias": True}, r"attention_bias=True: not supported"),
    ({"mlp_bias": True}, r"mlp_bias=True: not supported"),
    ({"hidden_act": "gelu"}, r"hidden_act='gelu': not supported"),
    ({"rope_parameters": {"rope_type": "longrope", "rope_theta": 1e4, "short_factor": [1.0],
                          "long_factor": [1.0]}}, r"rope type 'longrope': not supported"),
    ({"rope_parameters": {"rope_type": "linear", "rope_theta": 1e4, "factor": 2.0, "extra": 1}},
     r"key\(s\) \['extra'\] are not supported with rope type 'linear'"),
    ({"quantization_config": {"quant_method": "gptq"}}, r"key\(s\) \['quantization_config'\]: not supported"),
    ({"head_dim": 16}, r"head_dim=16: phoenix needs head_dim = hidden_size / num_attention_heads = 8"),
])
def test_unsupported_config_is_refused_by_name(llama, tmp_path, changes, message):
    edit_config(llama, **changes)
    with pytest.raises(ConversionError, match=message):
        convert(llama, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_another_architecture_is_named_not_reported_as_missing_keys(tmp_path):
    """A GPT-2 folder has none of the Llama-family keys: the refusal names the
    architecture and those supported, not a broken config.json."""
    from phoenix.convert.hf_config import read_hf_config

    (tmp_path / "config.json").write_text(json.dumps({
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "n_embd": 64, "n_layer": 2,
        "n_head": 4, "vocab_size": 384}))
    with pytest.raises(ConversionError, match=r"architectures \['GPT2LMHeadModel'\]: not "
                                              r"supported \(supported: .*LlamaForCausalLM"):
        read_hf_config(tmp_path / "config.json")


def test_mistral_sliding_window_is_refused_unless_null(llama, tmp_path):
    edit_config(llama, architectures=["MistralForCausalLM"], model_type="mistral", sliding_window=16)
    config = json.loads((llama / "config.json").read_text())
    for key in ("attention_bias", "mlp_bias", "pretraining_tp"):
        config.pop(key)
    (llama / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConversionError, match=r"sliding_window=16: smaller than "
                                              r"max_position_embeddings 64"):
        convert(llama, tmp_path / "out")


def test_folder_and_shard_errors(llama, tmp_path):
    with pytest.raises(ConversionError, match=r"no config.json"):
        convert(tmp_path, tmp_path / "out")
    with pytest.raises(ConversionError, match=r"nowhere: does not exist"):
        convert(tmp_path / "nowhere", tmp_path / "out")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{bad json")
    with pytest.raises(ConversionError, match=r"config.json: not a readable JSON file"):
        convert(broken, tmp_path / "out")
    config = json.loads((llama / "config.json").read_text())
    (broken / "config.json").write_text(json.dumps(
        {k: v for k, v in config.items() if k != "max_position_embeddings"}))
    with pytest.raises(ConversionError, match=r"missing key\(s\) \['max_position_embeddings'\]"):
        convert(broken, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    index = json.loads((llama / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2
    # the index names a tensor in the wrong shard
    wrong = dict(index)
    name = next(n for n, f in index["weight_map"].items() if f == shards[0])
    wrong["weight_map"] = {**index["weight_map"], name: shards[1]}
    (llama / "model.safetensors.index.json").write_text(json.dumps(wrong))
    with pytest.raises(ConversionError, match=r"does not match the shards \(1 tensor"):
        convert(llama, tmp_path / "out")
    # a shard is missing
    (llama / "model.safetensors.index.json").write_text(json.dumps(index))
    (llama / shards[1]).unlink()
    with pytest.raises(ConversionError, match=rf"shard\(s\) \['{shards[1]}'\] are missing"):
        convert(llama, tmp_path / "out")


def test_missing_and_unexplained_tensors(tmp_path):
    from safetensors.torch import load_file, save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                         num_hidden_layers=1, intermediate_size=48, vocab_size=200,
                         max_position_embeddings=64, tie_word_embeddings=False)
    folder = tmp_path / "one"
    LlamaForCausalLM(config).save_pretrained(folder)
    tensors = load_file(folder / "model.safetensors")
    extra = {**tensors, "model.layers.0.self_attn.q_proj.bias": torch.zeros(32)}
    save_file(extra, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ConversionError, match=r"does not explain .*q_proj.bias"):
        convert(folder, tmp_path / "out")
    del tensors["lm_head.weight"]
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ConversionError, match=r"missing: \['lm_head.weight'\]"):
        convert(folder, tmp_path / "out")
    ints = {**tensors, "lm_head.weight": torch.zeros(200, 32, dtype=torch.int8)}
    save_file(ints, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ConversionError, match=r"lm_head.weight has dtype torch.int8"):
        convert(folder, tmp_path / "out")


def test_tp_must_divide_and_output_must_be_new(llama, tmp_path):
    with pytest.raises(ConversionError, match=r"num_attention_heads 4 is not divisible by --tp 3; "
                                              r"num_query_groups \(num_key_value_heads\) 2"):
        convert(llama, tmp_path / "out", tp=3)
    with pytest.raises(ConversionError, match=r"num_layers 2 is not divisible by --pp 4"):
        convert(llama, tmp_path / "out", pp=4)
    (tmp_path / "taken").mkdir()
    with pytest.raises(ConversionError, match=r"taken already exists"):
        convert(llama, tmp_path / "taken")


def test_a_dtype_the_target_cannot_hold_fails_the_cli_and_leaves_nothing(llama, tmp_path):
    from safetensors.torch import load_file, save_file

    index = json.loads((llama / "model.safetensors.index.json").read_text())
    shard = index["weight_map"]["model.norm.weight"]
    tensors = load_file(llama / shard)
    tensors["model.norm.weight"] = torch.full_like(tensors["model.norm.weight"], 1e6)
    save_file(tensors, llama / shard, metadata={"format": "pt"})
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "phoenix.cli", "convert", "hf-to-phoenix",
                           str(llama), str(out), "--dtype", "fp16", "--no-progress"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert "model.norm.weight: its values (max |x| 1e+06) do not fit torch.float16" in proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["llama"]  # no OUT, no .tmp-OUT


def test_a_tokenizer_with_more_ids_than_embedding_rows_is_refused(llama, tmp_path):
    """Issue 23: a folder whose tokenizer.json has more ids than the model's 200 embedding
    rows was converted; now one line, exit 2, nothing written."""
    from phoenix.testing.hf_tiny import make_llama3_tokenizer
    from phoenix.tokenizer import load_tokenizer

    texts = [f"document {i}: the quick brown fox {i * 7} jumps over {i % 13} lazy dogs"
             for i in range(200)]
    make_llama3_tokenizer(llama, texts, vocab_size=300)
    ids = load_tokenizer(llama).vocab_size
    assert ids > 200
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "phoenix.cli", "convert", "hf-to-phoenix",
                           str(llama), str(out), "--no-progress"], capture_output=True, text=True)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (
        f"phoenix convert hf-to-phoenix: error: {llama}: tokenizer.json has {ids} token ids but "
        f"the model has 200 embedding rows (config.json vocab_size): ids 200..{ids - 1} have no "
        f"row; this tokenizer does not belong to these weights, nothing was written")
    assert not out.exists()
