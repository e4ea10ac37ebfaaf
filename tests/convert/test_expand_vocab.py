"""``phoenix expand-vocab --checkpoint``: a tiny Llama-3-shaped HF model imported with
hf-to-phoenix, its byte-level BPE expanded with Chinese words; the resized checkpoint's new
rows are the mean of the old sub-token rows (checked directly, embedding and output layer
separately), old rows are bit-identical, and the resized model's logits on text without
new tokens equal the old model's (on the old vocabulary). Bad inputs are refused by name."""

from __future__ import annotations

import json
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _docs(domain, n, seed=0):
    from phoenix.data.synthetic import generate_documents

    return [d["text"] for d in generate_documents(n, seed, domain=domain, max_words=80)]


def _load(folder: str, scratch: str):
    """The phoenix GPTModel of an hf-to-phoenix / expand-vocab folder (TP=PP=1)."""
    from phoenix.checkpoint import CheckpointStore
    from phoenix.checkpoint.store import resolve_checkpoint
    from phoenix.config.loader import read_yaml
    from phoenix.convert.common import conversion_config
    from phoenix.model import build_model
    from phoenix.runtime import init_runtime

    model = read_yaml(os.path.join(folder, "model.yaml"))
    cfg = conversion_config(model, {"model": "unused.model"}, scratch)
    layout = init_runtime(cfg)
    (gpt,) = build_model(cfg, layout, model["vocab_size"], wrap_ddp=False)
    ckpt = resolve_checkpoint(folder)
    CheckpointStore(ckpt.parent, layout.rank, layout.world_size).load_weights(ckpt, [gpt])
    return gpt.eval()


def _logits(gpt, ids):
    x = torch.tensor([ids])
    with torch.no_grad():
        return gpt(x, torch.arange(x.shape[1])[None], attention_mask=None)[0]


def resize_and_compare(hf_dir: str, root: str, words: list[str]) -> dict:
    from phoenix.convert.hf_import import hf_to_phoenix
    from phoenix.convert.expand_vocab import expand_checkpoint, old_subtoken_ids
    from phoenix.tokenizer import load_tokenizer

    imported, out = os.path.join(root, "imported"), os.path.join(root, "expanded")
    hf_to_phoenix(hf_dir, imported, progress=False)
    info = expand_checkpoint(imported, os.path.join(imported, "tokenizer"), out, surfaces=words)
    old_tok = load_tokenizer(os.path.join(imported, "tokenizer"))
    new_tok = load_tokenizer(os.path.join(out, "tokenizer"))
    old, new = _load(imported, os.path.join(root, "s")), _load(out, os.path.join(root, "s"))
    text = " ".join(_docs("web", 3, seed=11))[:400]
    ids = new_tok.encode(text)
    assert ids == old_tok.encode(text)
    a, b = _logits(old, ids), _logits(new, ids)
    sources = {i: old_subtoken_ids(old_tok, new_tok, i)
               for i in range(old_tok.vocab_size, new_tok.vocab_size)}
    return {"info": info, "old_sd": {k: v.clone() for k, v in old.state_dict().items()
                                     if not k.endswith("_extra_state")},
            "new_sd": {k: v.clone() for k, v in new.state_dict().items()
                       if not k.endswith("_extra_state")},
            "logits_old": a, "logits_new": b, "sources": sources,
            "old_vocab": old_tok.vocab_size, "new_vocab": new_tok.vocab_size, "out": out}


@pytest.fixture(scope="module")
def resized(tmp_path_factory):
    from phoenix.testing.distributed import run_distributed
    from phoenix.testing.hf_tiny import make_llama3_model, make_llama3_tokenizer
    from phoenix.data.synthetic import _ZH_WORDS

    hf_dir = tmp_path_factory.mktemp("hf") / "llama3"
    make_llama3_tokenizer(hf_dir, _docs("web", 150), 384)
    make_llama3_model(hf_dir, 392)
    root = str(tmp_path_factory.mktemp("resize"))
    (result,) = run_distributed(resize_and_compare, 1, str(hf_dir), root, list(_ZH_WORDS[:40]))
    return result


@pytest.mark.slow
def test_new_rows_are_the_mean_of_the_old_subtoken_rows(resized):
    old, new = resized["old_sd"], resized["new_sd"]
    n_old, n_new = resized["old_vocab"], resized["new_vocab"]
    info = resized["info"]
    assert (info["old_vocab_size"], info["new_vocab_size"]) == (n_old, n_new) and n_new > n_old + 40
    assert info["padded_vocab_size"] == 128 * -(-n_new // 128) == new["embedding.word_embeddings.weight"].shape[0]
    for name in ("embedding.word_embeddings.weight", "output_layer.weight"):
        assert torch.equal(new[name][:n_old], old[name][:n_old]), name
        assert not new[name][n_new:].any()  # padding rows are zero
        for tid, ids in resized["sources"].items():
            assert len(ids) >= 1
            assert torch.allclose(new[name][tid], old[name][ids].mean(0), atol=0, rtol=0), (name, tid)
        # The two matrices are untied: their new rows differ.
        assert not torch.equal(new["embedding.word_embeddings.weight"][n_old:n_new],
                               new["output_layer.weight"][n_old:n_new])
    for name, tensor in old.items():  # every other weight is unchanged
        if name not in ("embedding.word_embeddings.weight", "output_layer.weight"):
            assert torch.equal(new[name], tensor), name


@pytest.mark.slow
def test_resized_model_gives_the_same_logits_on_old_text(resized):
    n_old = resized["old_vocab"]
    a, b = resized["logits_old"], resized["logits_new"]
    err = (a[:, :n_old] - b[:, :n_old]).abs().max().item()
    print(f"resized vs old model: max |logit difference| on the old vocabulary {err:.3g}")
    assert err == 0.0


@pytest.mark.slow
def test_outputs_and_refusals(resized, tmp_path):
    from phoenix.cli import main

    out = resized["out"]
    info = json.load(open(os.path.join(out, "vocab_expansion.json")))
    assert info["use"]["tokenizer.hf_dir"] == os.path.join(out, "tokenizer")
    assert os.path.isfile(os.path.join(out, "hf_config.json"))
    assert "optimizer" not in os.listdir(os.path.join(out, "checkpoints", "step_000000"))
    # A checkpoint resized for another tokenizer than its own: refused by name.
    rc = main(["expand-vocab", os.path.join(out, "tokenizer").replace("expanded", "imported"),
               "--tokens", __file__, "--checkpoint", out, "--out", str(tmp_path / "x")])
    assert rc == 2 and not (tmp_path / "x").exists()
