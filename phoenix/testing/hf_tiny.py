"""A tiny random Llama-3-shaped Hugging Face model and its byte-level BPE tokenizer, made
here (never downloaded), for tests and the CPU run of the Llama-3 continual-pretraining
recipe (examples/continual_pretrain_llama3.sh).

The tokenizer follows Llama-3's layout: byte-level BPE with ``ignore_merges``, the
Llama-3 split regex, the specials appended after the learned vocabulary
(``<|begin_of_text|>``, ``<|end_of_text|>``, reserved tokens, ``<|eot_id|>``) and a
post-processor that prepends BOS.

    python -m phoenix.testing.hf_tiny OUT --corpus web.jsonl [--corpus ...] [--vocab-size 384]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

BOS, EOS, EOT = "<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"
SPECIALS = [BOS, EOS] + [f"<|reserved_special_token_{i}|>" for i in range(5)] + [EOT]
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}"
                r"\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


def make_llama3_tokenizer(folder: str | os.PathLike, texts, vocab_size: int = 384) -> Path:
    """Train the tokenizer on ``texts`` (learned vocabulary ``vocab_size``, specials after
    it) and save ``tokenizer.json`` + ``tokenizer_config.json`` into ``folder``."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(ignore_merges=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(list(texts), trainer=trainer)
    tok.add_special_tokens(SPECIALS)
    tok.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B",
                                      special_tokens=[(BOS, tok.token_to_id(BOS))])])
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": BOS, "eos_token": EOS, "tokenizer_class": "PreTrainedTokenizerFast",
         "model_max_length": 8192}, indent=2) + "\n")
    return folder


def make_llama3_model(folder: str | os.PathLike, vocab_size: int, *, hidden: int = 64,
                      layers: int = 2, heads: int = 4, groups: int = 2, ffn: int = 128,
                      max_positions: int = 256, seed: int = 0, tied: bool = False) -> Path:
    """Save a random fp32 ``LlamaForCausalLM`` (GQA, llama3 RoPE scaling) into ``folder``."""
    import torch
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=groups, intermediate_size=ffn,
        max_position_embeddings=max_positions, rms_norm_eps=1e-5, tie_word_embeddings=tied,
        bos_token_id=None, eos_token_id=None,
        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                         "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": max_positions // 4})
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(config).float().eval()
    model.save_pretrained(str(folder))
    return Path(folder)


def _texts(paths, key: str = "text"):
    for path in paths:
        with open(path, encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    yield json.loads(line)[key]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m phoenix.testing.hf_tiny", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", help="the HF folder to write (model + tokenizer)")
    p.add_argument("--corpus", action="append", required=True, help="JSONL to train the BPE on")
    p.add_argument("--vocab-size", type=int, default=384, help="learned tokens (before specials)")
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    args = p.parse_args(argv)
    from tokenizers import Tokenizer

    folder = make_llama3_tokenizer(args.out, _texts(args.corpus), args.vocab_size)
    size = Tokenizer.from_file(str(folder / "tokenizer.json")).get_vocab_size(with_added_tokens=True)
    make_llama3_model(folder, size, hidden=args.hidden, layers=args.layers)
    print(f"wrote {folder} (vocabulary {size})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
