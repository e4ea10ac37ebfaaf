"""Test support of the needle eval (tests/eval/test_needle.py): stub ``generate_fn``\\ s
and a worker that runs the megatron greedy decoding inside spawned ranks."""

from __future__ import annotations

import re

from phoenix.config import build_config


def copy_passkey_fn(tokenizer, extra: str = " is the pass key."):
    """A stub ``generate_fn`` that answers every prompt with the passkey it reads from the
    needle in the prompt's text, followed by ``extra``."""
    from phoenix.eval.needle import NEEDLE_TEXT

    pattern = re.compile(re.escape(NEEDLE_TEXT).replace(re.escape("{key}"), r"(\d+)"))

    def generate(prompts):
        return [tokenizer.encode(" " + pattern.search(tokenizer.decode(ids)).group(1) + extra)
                for ids in prompts]

    return generate


def needle_greedy(config: dict, overrides: list[str], checkpoint: str, needle: dict,
                  reference: bool = False) -> dict:
    """In a spawned rank: the model of ``config`` with ``checkpoint``'s weights, the needle
    prompts of ``needle`` (a NeedleConfig mapping) at the config's seq_length, the greedy
    tokens of the first two prompts, and the collective evaluation. ``reference`` (one
    process): also the greedy tokens from a plain argmax over the full logits."""
    import torch

    from phoenix.checkpoint import load_model
    from phoenix.config.eval import NeedleConfig
    from phoenix.eval.needle_run import NeedleEvaluator
    from phoenix.runtime import init_runtime
    from phoenix.tokenizer import load_tokenizer, model_vocab_size

    cfg = build_config(config, overrides)
    layout = init_runtime(cfg)
    tokenizer = load_tokenizer(cfg.tokenizer)
    vocab = model_vocab_size(cfg, tokenizer)
    model = load_model(checkpoint, cfg, layout, vocab_size=vocab)
    evaluator = NeedleEvaluator(model, layout, NeedleConfig(**needle), tokenizer,
                                vocab_size=vocab, micro_batch_size=2)
    tasks = evaluator.tasks(cfg.data.seq_length)
    prompts = [t.input_ids for t in tasks[:2]]
    model[0].eval()
    with torch.no_grad():
        generated = evaluator.generate(prompts)
    out = {"generated": generated, "prompt_len": len(prompts[0]),
           "new_tokens": evaluator.cfg.new_tokens, "vocab": vocab,
           "result": evaluator.evaluate(cfg.data.seq_length).to_dict(),
           "layout": layout.describe()}
    if reference:
        tokens = torch.tensor(prompts)
        with torch.no_grad():
            for _ in range(evaluator.cfg.new_tokens):
                positions = torch.arange(tokens.size(1)).unsqueeze(0).expand_as(tokens)
                logits = model[0](tokens, positions, attention_mask=None)
                nxt = logits[:, -1, :vocab].argmax(dim=-1)
                tokens = torch.cat([tokens, nxt[:, None]], dim=1)
        out["reference"] = tokens[:, len(prompts[0]):].tolist()
    return out
