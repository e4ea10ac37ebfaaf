"""Padded vocabulary columns take no part in the softmax (issue 22, 3.1).

A tiny Llama-3 layout with vocabulary 320 (not a multiple of 128: the output layer is
padded to 384) is imported from transformers, and on the same tokens
phoenix's eval loss (``phoenix.eval.metrics.token_stats``, the evaluator's loss function)
and the training loss (the per-token loss ``GPTModel`` computes from labels, megatron's
vocab-parallel cross entropy) equal transformers' loss, at TP=1 and TP=2. The padded rows
get no gradient. The old behaviour (imported zero rows: logit 0 in the denominator) is
computed too and must differ, so the comparison can fail.
"""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

VOCAB, SEQ, TOL = 320, 33, 1e-5


def tokens() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, VOCAB, (2, SEQ), generator=g)


def losses(path: str, scratch: str) -> dict:
    """Two ranks: TP=1 (two DP replicas), then TP=2; eval and training losses."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from phoenix.checkpoint import CheckpointStore
    from phoenix.checkpoint.store import resolve_checkpoint
    from phoenix.config.loader import read_yaml
    from phoenix.convert.common import conversion_config
    from phoenix.eval.metrics import token_stats
    from phoenix.model import build_model
    from phoenix.runtime import init_runtime

    model = read_yaml(os.path.join(path, "model.yaml"))
    x = tokens()
    inputs, labels = x[:, :-1], x[:, 1:]
    pos = torch.arange(SEQ - 1).expand_as(inputs)
    out = {}
    for tp in (1, 2):
        cfg = conversion_config(model, {"model": "unused.model"}, scratch)
        cfg.parallel.tensor = tp
        if tp == 1:
            cfg.train.global_batch_size = 2  # two DP replicas
        layout = init_runtime(cfg)
        (gpt,) = build_model(cfg, layout, model["vocab_size"], wrap_ddp=False)
        ckpt = resolve_checkpoint(path)
        CheckpointStore(ckpt.parent, layout.rank, layout.world_size).load_weights(ckpt, [gpt])
        gpt.eval()
        with torch.no_grad():
            logits = gpt(inputs, pos, attention_mask=None)  # [b, s, padded / tp]
            stats = token_stats(logits.clone(), labels, torch.ones_like(labels), VOCAB,
                                layout.tp_group if tp > 1 else None)
        token_loss = gpt(inputs, pos, attention_mask=None, labels=labels)  # training's loss
        token_loss.mean().backward()
        weight = gpt.output_layer.weight
        real = min(max(VOCAB - layout.tp_rank * weight.shape[0], 0), weight.shape[0])
        parts = [torch.empty_like(logits) for _ in range(tp)]
        dist.all_gather(parts, logits.contiguous(), group=layout.tp_group)
        full = torch.cat(parts, dim=-1)
        old = torch.where(torch.isinf(full), 0.0, full)  # zero rows: logit 0 (the fault)
        out[tp] = dict(eval=(stats[0] / stats[1]).item(), train=token_loss.mean().item(),
                       old=torch.nn.functional.cross_entropy(old.flatten(0, 1), labels.flatten()).item(),
                       pad_grad=weight.grad[real:].abs().max().item() if real < weight.shape[0] else 0.0,
                       finite_grad=all(torch.isfinite(p.grad).all().item()
                                       for p in gpt.parameters() if p.grad is not None),
                       padded=full.shape[-1])
        ps.destroy_model_parallel()
    return out


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    import transformers

    from phoenix.convert.hf_import import hf_to_phoenix
    from phoenix.testing.distributed import run_distributed
    from phoenix.testing.hf_tiny import make_llama3_model

    root = tmp_path_factory.mktemp("padvocab")
    make_llama3_model(root / "hf", VOCAB)
    hf = transformers.AutoModelForCausalLM.from_pretrained(root / "hf", dtype=torch.float32).eval()
    with torch.no_grad():
        reference = hf(tokens(), labels=tokens()).loss.item()
    hf_to_phoenix(str(root / "hf"), str(root / "px"), progress=False)
    ranks = run_distributed(losses, 2, str(root / "px"), str(root / "scratch"))
    return reference, ranks


@pytest.mark.parametrize("tp", [1, 2])
def test_eval_and_training_loss_range_over_the_real_vocabulary(results, tp):
    reference, ranks = results
    for r in ranks:
        got = r[tp]
        print(f"TP={tp} transformers {reference:.6f} eval {got['eval']:.6f} "
              f"train {got['train']:.6f} old {got['old']:.6f} padded {got['padded']}")
        assert got["padded"] > VOCAB                       # there are padded columns
        assert abs(got["eval"] - reference) <= TOL
        assert abs(got["train"] - reference) <= TOL
        assert abs(got["old"] - reference) > 100 * TOL     # the old fault is visible here
        assert got["pad_grad"] == 0.0 and got["finite_grad"]
