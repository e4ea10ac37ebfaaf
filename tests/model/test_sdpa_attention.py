"""``model.attention_backend: sdpa`` computes what megatron's unfused DotProductAttention
computes: the same logits (fp32, 1e-5), loss and gradients from the same weights, for
multi-head and grouped-query attention, the dense document mask, YaRN (its attention
factor reaches q and k before core attention) and TP=2 on real gloo ranks; a training run
resumed with sdpa from an unfused checkpoint continues with the same loss and grad norm.
Context parallelism is refused."""

import shutil
from types import SimpleNamespace

import pytest
import torch

from phoenix.testing.distributed import run_distributed
from phoenix.testing.tiny import tiny_config_dict
from phoenix.testing.workers import train_and_record

VOCAB, EOD = 256, 3
CASES = {
    "mha": ["model.num_query_groups=null"],
    "gqa": [],  # tiny: 4 heads, 2 query groups
    "document_mask": ["data.document_mask=true"],
    "yarn": ["model.rope={scaling: yarn, factor: 4, original_max_position_embeddings: 16}"],
}


def _sdpa_vs_unfused(out_dir: str, tp: int, cases: list[str]) -> dict:
    """Per case: max |logits difference|, |loss difference| and the largest gradient
    difference relative to that parameter's largest gradient, unfused vs sdpa."""
    from phoenix.data.documents import DocumentInputs
    from phoenix.model import build_model
    from phoenix.model.attention_inputs import document_forward
    from phoenix.runtime import init_runtime
    from phoenix.testing.tiny import TinyData, tiny_config

    files = TinyData("/unused/tokenizer.model", {"web": "/unused/web", "code": "/unused/code"})
    layout = None
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(4, VOCAB, (2, 32), generator=g)
    tokens[0, [7, 19]] = EOD
    tokens[1, 12] = EOD
    labels = torch.randint(0, VOCAB, (2, 32), generator=g)
    out = {}
    for case in cases:
        results = {}
        for backend in ("unfused", "sdpa"):
            cfg = tiny_config(files, out_dir, [f"parallel.tensor={tp}", *CASES[case],
                                               f"model.attention_backend={backend}"])
            layout = layout or init_runtime(cfg)
            torch.manual_seed(0)
            gpt = build_model(cfg, layout, VOCAB, wrap_ddp=False)[0]
            if backend == "sdpa":
                gpt.load_state_dict(results["unfused"]["state"])
                assert sum("SDPAttention" in type(m).__name__ for m in gpt.modules()) == 4
            dev = layout.device
            batch = DocumentInputs(EOD, document_mask=cfg.data.document_mask)(
                {"tokens": tokens, "loss_mask": torch.ones(tokens.shape),
                 "position_ids": torch.arange(32).expand(2, 32)})
            t, pos, lab = tokens.to(dev), batch["position_ids"].to(dev), labels.to(dev)
            if cfg.data.document_mask:
                seg = batch["segment_ids"].to(dev)
                logits = document_forward(gpt, t, pos, seg)
                loss = document_forward(gpt, t, pos, seg, labels=lab).sum()
            else:
                logits = gpt(t, pos, None)
                loss = gpt(t, pos, None, labels=lab).sum()
            loss.backward()
            results[backend] = {"state": gpt.state_dict(), "logits": logits.detach(),
                                "loss": loss.item(),
                                "grads": {n: p.grad.clone() for n, p in gpt.named_parameters()}}
        a, b = results["unfused"], results["sdpa"]
        out[case] = {
            "logits": (a["logits"] - b["logits"]).abs().max().item(),
            "loss": abs(a["loss"] - b["loss"]) / abs(a["loss"]),
            "grad": max(((a["grads"][n] - g_).abs().max() / a["grads"][n].abs().max()).item()
                        for n, g_ in b["grads"].items()),
        }
    return out


def _check(results: list[dict], cases: list[str]) -> None:
    for rank_result in results:
        assert sorted(rank_result) == sorted(cases)
        for case, d in rank_result.items():
            assert d["logits"] <= 1e-5 and d["loss"] <= 1e-6 and d["grad"] <= 1e-5, (case, d)


def test_sdpa_equals_unfused(tmp_path):
    cases = list(CASES)
    _check(run_distributed(_sdpa_vs_unfused, 1, str(tmp_path), 1, cases), cases)


@pytest.mark.slow
def test_sdpa_equals_unfused_tp2(tmp_path):
    cases = ["mha", "document_mask"]  # GQA: 2 groups over 2 ranks, one per rank
    _check(run_distributed(_sdpa_vs_unfused, 2, str(tmp_path), 2, cases), cases)


@pytest.mark.slow
def test_resume_with_sdpa_continues_an_unfused_run(tiny_data, tmp_path):
    """Steps 1-3 unfused (checkpoint at step 2), then step 3 again from that checkpoint with
    sdpa: the same loss and grad norm (the backend is a free change on resume)."""
    ref_dir, resumed_dir = tmp_path / "unfused", tmp_path / "sdpa"
    cfg = tiny_config_dict(tiny_data, ref_dir, train={"steps": 3},
                           checkpoint={"save_interval": 2, "save_at_end": False})
    (ref,) = run_distributed(train_and_record, 1, cfg)
    shutil.copytree(ref_dir / "checkpoints", resumed_dir / "checkpoints")
    cfg["output_dir"] = str(resumed_dir)
    (resumed,) = run_distributed(train_and_record, 1, cfg, ["model.attention_backend=sdpa"])
    assert [s["step"] for s in resumed["steps"]] == [3]
    got, want = resumed["steps"][0], ref["steps"][2]
    assert got["loss"] == pytest.approx(want["loss"], rel=1e-5, abs=0)
    assert got["grad_norm"] == pytest.approx(want["grad_norm"], rel=1e-5, abs=0)


def test_context_parallelism_is_refused():
    from phoenix.model.sdpa_attention import SDPAttention

    config = SimpleNamespace(context_parallel_size=2, softmax_type="vanilla", window_size=None)
    with pytest.raises(ValueError, match=r"^model\.attention_backend: sdpa does not support "
                                         r"context parallelism \(parallel\.context=2\)"):
        SDPAttention(config, layer_number=1, attn_mask_type=None, attention_type="self")


def test_one_additive_mask_per_document_mask():
    """Every layer gets the same float mask of a micro-batch's bool mask (SDPA would keep a
    converted copy per layer): 0 where attention is allowed, -inf elsewhere."""
    from phoenix.model.attention_inputs import dense_document_mask
    from phoenix.model.sdpa_attention import additive_mask

    mask = dense_document_mask(torch.tensor([[0, 0, 0, 1, 1]]))
    bias = additive_mask(mask, torch.float32)
    assert additive_mask(mask, torch.float32) is bias
    assert torch.equal(bias == 0, ~mask) and torch.isinf(bias[mask]).all()
    assert additive_mask(mask, torch.bfloat16).dtype == torch.bfloat16
