"""``phoenix generate`` and its decoder (:mod:`phoenix.eval.decoding`).

A tiny random Llama-3 (GQA, llama3 RoPE, vocabulary 308 padded to 384) is built with
transformers and imported. Oracle: transformers' own ``generate`` (greedy) on the same
weights. Phoenix's KV-cached greedy decode and its full-recompute decode must both give
transformers' tokens, token for token, at TP=1 and TP=2 (real gloo ranks), for prompts of
different lengths in one call; a seeded sampled decode gives the same tokens with and
without the cache and on every TP rank. Top-k / top-p filtering is checked against
transformers' logits warpers. The CLI prints the same ids."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

VOCAB_LEARNED, NEW = 300, 10
PROMPTS = [[5, 17, 99, 42, 7, 250, 3], [11, 12, 13], [200, 201, 202, 203, 204, 205, 206, 19, 8]]


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    """The HF model and its phoenix import. The import runs in its own process: phoenix's
    CPU device emulation must not be active in this one, whose transformers computations
    are the oracle (and so are other test modules' after it)."""
    from phoenix.testing.hf_tiny import make_llama3_model, make_llama3_tokenizer

    root = tmp_path_factory.mktemp("decoding")
    texts = [f"the quick brown fox {i} jumps over {i * 7} lazy dogs" for i in range(200)]
    tok_dir = make_llama3_tokenizer(root / "hf", texts, vocab_size=VOCAB_LEARNED)
    vocab = len(json.loads((tok_dir / "tokenizer.json").read_text())["model"]["vocab"]) + 8
    make_llama3_model(root / "hf", vocab)
    proc = _cli(["convert", "hf-to-phoenix", str(root / "hf"), str(root / "px")], root)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return root, vocab


@pytest.fixture(scope="module")
def reference(imported):
    """transformers' greedy tokens for each prompt."""
    import transformers

    root, _ = imported
    hf = transformers.AutoModelForCausalLM.from_pretrained(root / "hf", dtype=torch.float32).eval()
    out = []
    for p in PROMPTS:
        ids = torch.tensor([p])
        gen = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW,
                          do_sample=False, eos_token_id=None, pad_token_id=0)
        out.append(gen[0, len(p):].tolist())
    return out


def _decode_all(path: str, scratch: str, tp: int) -> dict:
    from megatron.core import parallel_state as ps

    from phoenix.checkpoint import load_model
    from phoenix.checkpoint.store import resolve_checkpoint
    from phoenix.config.loader import read_yaml
    from phoenix.convert.common import conversion_config
    from phoenix.eval.decoding import Decoder, SamplingParams
    from phoenix.runtime import init_runtime

    model = read_yaml(os.path.join(path, "model.yaml"))
    cfg = conversion_config(model, {"model": "unused.model"}, scratch)
    cfg.parallel.tensor = tp
    layout = init_runtime(cfg)
    chunks = load_model(resolve_checkpoint(path), cfg, layout, vocab_size=model["vocab_size"])
    greedy = SamplingParams(max_new_tokens=NEW)
    sampled = SamplingParams(max_new_tokens=NEW, temperature=0.9, top_k=50, top_p=0.95, seed=3)
    kv = Decoder(chunks, layout, model["vocab_size"])
    full = Decoder(chunks, layout, model["vocab_size"], kv_cache=False)
    out = {"uses_kv": kv.kv_cache,
           "kv": kv.generate(PROMPTS, greedy), "full": full.generate(PROMPTS, greedy),
           "kv_sampled": kv.generate(PROMPTS, sampled), "full_sampled": full.generate(PROMPTS, sampled),
           "stopped": kv.generate(PROMPTS[:1], SamplingParams(max_new_tokens=NEW, stop_ids=(-1,))),
           "training_mode_restored": chunks[0].training}
    first = out["kv"][0]
    out["stop_at_third"] = kv.generate(PROMPTS[:1], SamplingParams(max_new_tokens=NEW,
                                                                   stop_ids=(first[2],)))[0]
    ps.destroy_model_parallel()
    return out


@pytest.fixture(scope="module")
def decoded(imported, tmp_path_factory):
    from phoenix.testing.distributed import run_distributed

    root, _ = imported
    scratch = str(tmp_path_factory.mktemp("scratch"))
    return {1: run_distributed(_decode_all, 1, str(root / "px"), scratch, 1),
            2: run_distributed(_decode_all, 2, str(root / "px"), scratch, 2)}


@pytest.mark.parametrize("tp", [1, 2])
def test_greedy_equals_transformers_generate_with_and_without_kv_cache(decoded, reference, tp):
    for rank in decoded[tp]:
        assert rank["uses_kv"] is True
        assert rank["kv"] == reference
        assert rank["full"] == reference


@pytest.mark.parametrize("tp", [1, 2])
def test_seeded_sampling_is_the_same_with_the_cache_and_on_every_rank(decoded, reference, tp):
    ranks = decoded[tp]
    assert ranks[0]["kv_sampled"] == ranks[0]["full_sampled"]
    assert all(r["kv_sampled"] == ranks[0]["kv_sampled"] for r in ranks)
    assert ranks[0]["kv_sampled"] != reference  # it does sample


def test_stop_ids_end_the_continuation_and_the_mode_is_restored(decoded, reference):
    rank = decoded[1][0]
    first = reference[0]
    assert rank["stopped"] == [first]  # an id that never comes: all NEW tokens
    assert rank["stop_at_third"] == first[: first.index(first[2]) + 1]
    assert rank["training_mode_restored"] is True  # load_model's chunks start in train mode


def test_top_k_top_p_filter_equals_transformers_warpers():
    from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

    from phoenix.eval.decoding import filter_logits

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 50, generator=g) * 3
    for k, p in [(0, 0.9), (5, 1.0), (10, 0.5), (0, 0.3), (3, 0.99)]:
        ours = filter_logits(logits, top_k=k, top_p=p)
        theirs = logits.clone()
        if k:
            theirs = TopKLogitsWarper(k)(None, theirs)
        if p < 1:
            theirs = TopPLogitsWarper(p)(None, theirs)
        assert torch.equal(torch.isinf(ours), torch.isinf(theirs)), (k, p)


def test_refusals():
    from types import SimpleNamespace

    from phoenix.config import ConfigError
    from phoenix.eval.decoding import SamplingParams, check_decoding_layout

    with pytest.raises(ConfigError, match=r"^top_p: must be in \(0, 1\]"):
        SamplingParams(top_p=0)
    with pytest.raises(ConfigError, match=r"^temperature: must be >= 0"):
        SamplingParams(temperature=-1)
    layout = SimpleNamespace(pp_size=2, dp_size=1, dp_cp_size=1)
    with pytest.raises(ConfigError, match=r"^generate: needs one pipeline stage"):
        check_decoding_layout(layout)


def _cli(args: list, cwd) -> subprocess.CompletedProcess:
    """``python -m phoenix.cli ARGS`` as a fresh single-process job (no launcher variables
    left by the in-process runtimes of this test session)."""
    from phoenix.testing.processes import LAUNCH_ENV

    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_ENV}
    return subprocess.run([sys.executable, "-m", "phoenix.cli", *args], capture_output=True,
                          text=True, timeout=300, cwd=cwd, env=env)


def test_cli_prints_the_same_tokens(imported, reference, tmp_path):
    root, _ = imported
    from phoenix.tokenizer import load_tokenizer

    tok = load_tokenizer(str(root / "px" / "tokenizer"))
    text = "the quick brown fox 12 jumps"
    ids = tok.encode(text)
    proc = _cli(["generate", str(root / "px"), "--prompt", text, "--max-new-tokens", str(NEW),
                 "--ignore-eos", "--json"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (line,) = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    item = json.loads(line)
    assert item["prompt_ids"] == ids
    import transformers

    hf = transformers.AutoModelForCausalLM.from_pretrained(root / "hf", dtype=torch.float32).eval()
    x = torch.tensor([ids])
    want = hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=NEW, do_sample=False,
                       eos_token_id=None, pad_token_id=0)[0, len(ids):].tolist()
    assert item["new_ids"] == want
    assert item["text"] == tok.decode(want)
    bad = _cli(["generate", str(root / "px"), "--prompt", "x", "--top-p", "0"], tmp_path)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert "--top-p: must be in (0, 1]" in bad.stderr
