"""Hugging Face <-> phoenix conversion against transformers, the oracle nobody here wrote.

Tiny random fp32 models built from config objects (never downloaded) are saved with
``save_pretrained``, imported with ``phoenix convert hf-to-phoenix``, loaded into phoenix's
GPTModel, and their logits compared with transformers' at TP=1 (one process), at TP=2 and
PP=2 (one 2-process gloo launch; the checkpoint reshards through dist_checkpointing), on a
sequence 4x past the original context for the rope-scaled ones. The export then gives the
source safetensors back bit for bit and loads with ``AutoModelForCausalLM``; an imported
checkpoint trains through ``checkpoint.init_from``.
"""

from __future__ import annotations

import glob
import json
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

LOGIT_TOL = 1e-4
VOCAB = 512
SEQ = 64
BASE = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2,
            intermediate_size=96, vocab_size=VOCAB, max_position_embeddings=SEQ)
CASES = {
    # Llama-3.1: GQA 4 heads / 2 groups, llama3 scaling from an original context of 16
    "llama31": ("LlamaConfig", dict(rms_norm_eps=1e-5, tie_word_embeddings=False, rope_parameters={
        "rope_type": "llama3", "rope_theta": 500.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 16})),
    "llama_yarn": ("LlamaConfig", dict(tie_word_embeddings=True, rope_parameters={
        "rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
        "original_max_position_embeddings": 16})),
    # Qwen2: QKV bias, tied embeddings, eps 1e-6
    "qwen2": ("Qwen2Config", dict(rms_norm_eps=1e-6, tie_word_embeddings=True,
                                  rope_parameters={"rope_type": "default", "rope_theta": 1e4})),
    "mistral": ("MistralConfig", dict(sliding_window=None, rms_norm_eps=1e-5,
                                      rope_parameters={"rope_type": "default", "rope_theta": 1e4})),
}
SHARDED = "llama31"  # saved in several shards (an index and its files)


def make_hf_model(kind: str, out_dir: str):
    import transformers

    config_cls, kw = CASES[kind]
    config = getattr(transformers, config_cls)(**BASE, **kw)
    config._attn_implementation = "eager"
    model_cls = getattr(transformers, config_cls.replace("Config", "ForCausalLM"))
    torch.manual_seed(hash(kind) % 1000)
    model = model_cls(config).float().eval()
    with torch.no_grad():  # norms are ones and biases zero at init: make them count
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.copy_(torch.randn_like(p) * 0.3 + (1.0 if "norm" in name else 0.0))
    model.save_pretrained(out_dir, max_shard_size="40KB" if kind == SHARDED else "1GB")
    return model


def tokens() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, VOCAB, (2, SEQ), generator=g)


# ------------------------------------------------------------ code run in spawned ranks


def _logits(path: str, out_dir: str, layout_kw: dict):
    """Load the phoenix checkpoint ``path`` (an hf-to-phoenix OUT) at ``layout_kw`` and
    return the full logits on this rank's last stage (None elsewhere)."""
    import torch.distributed as dist

    from phoenix.checkpoint import CheckpointStore
    from phoenix.checkpoint.store import resolve_checkpoint
    from phoenix.config.loader import read_yaml
    from phoenix.convert.common import conversion_config
    from phoenix.model import build_model
    from phoenix.runtime import init_runtime

    model = read_yaml(os.path.join(path, "model.yaml"))
    cfg = conversion_config(model, {"model": "unused.model"}, out_dir)
    cfg.parallel.tensor, cfg.parallel.pipeline = layout_kw.get("tp", 1), layout_kw.get("pp", 1)
    if layout_kw.get("ep", 1) > 1:  # MoE (test_hf_moe_convert.py): EP ranks are DP ranks
        cfg.parallel.expert = cfg.train.global_batch_size = layout_kw["ep"]
    layout = init_runtime(cfg)
    (gpt,) = build_model(cfg, layout, model["vocab_size"], wrap_ddp=False)
    ckpt = resolve_checkpoint(path)
    CheckpointStore(ckpt.parent, layout.rank, layout.world_size).load_weights(ckpt, [gpt])
    gpt.eval()
    x = tokens()
    pos = torch.arange(SEQ).expand_as(x)
    with torch.no_grad():
        if layout.pp_size > 1:  # two stages by hand: hidden states go rank 0 -> rank 1
            hidden = torch.empty(SEQ, x.shape[0], model["hidden_size"], device=layout.device)
            if layout.is_first_stage:
                hidden = gpt(x, pos, attention_mask=None)
                dist.send(hidden.contiguous(), dst=1)
                return None
            dist.recv(hidden, src=0)
            gpt.set_input_tensor(hidden)
        logits = gpt(x, pos, attention_mask=None)
    if layout.tp_size > 1:  # the output layer is vocab-parallel
        parts = [torch.empty_like(logits) for _ in range(layout.tp_size)]
        dist.all_gather(parts, logits.contiguous(), group=layout.tp_group)
        logits = torch.cat(parts, dim=-1)
    return logits[..., :VOCAB]


def import_and_check(hf_dirs: dict, out_root: str) -> dict:
    """One rank: import every model, TP=1 logits, export (round trip)."""
    from phoenix.convert.hf_export import phoenix_to_hf
    from phoenix.convert.hf_import import hf_to_phoenix

    results = {}
    for kind, hf_dir in hf_dirs.items():
        out = os.path.join(out_root, kind)
        hf_to_phoenix(hf_dir, out, tp=2, pp=2, progress=False)
        logits = _logits(out, os.path.join(out_root, "scratch"), {})
        exported = os.path.join(out_root, kind + "_hf")
        phoenix_to_hf(out, exported, max_shard_bytes=60_000, progress=False)
        results[kind] = {"logits": logits, "out": out, "exported": exported}
    return results


def parallel_logits(paths: dict, scratch: str) -> dict:
    """Two ranks: every model at TP=2, then the sharded one at PP=2."""
    from megatron.core import parallel_state as ps

    got = {}
    for kind, path in paths.items():
        got[("tp2", kind)] = _logits(path, scratch, {"tp": 2})
    ps.destroy_model_parallel()
    got[("pp2", SHARDED)] = _logits(paths[SHARDED], scratch, {"pp": 2})
    return got


# ------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    models, dirs = {}, {}
    for kind in CASES:
        dirs[kind] = str(root / kind)
        models[kind] = make_hf_model(kind, dirs[kind])
    return models, dirs


@pytest.fixture(scope="module")
def converted(hf_models, tmp_path_factory):
    from phoenix.testing.distributed import run_distributed

    _, dirs = hf_models
    (results,) = run_distributed(import_and_check, 1, dirs, str(tmp_path_factory.mktemp("conv")))
    return results


@pytest.fixture(scope="module")
def reference_logits(hf_models):
    models, _ = hf_models
    with torch.no_grad():
        return {kind: m(tokens()).logits.float() for kind, m in models.items()}


# ------------------------------------------------------------ tests


@pytest.mark.slow
@pytest.mark.parametrize("kind", list(CASES))
def test_imported_logits_match_transformers_tp1(converted, reference_logits, kind):
    err = (converted[kind]["logits"] - reference_logits[kind]).abs().max().item()
    print(f"{kind} TP=1 max |logit error| {err:.3g}")
    assert err <= LOGIT_TOL


@pytest.mark.slow
def test_imported_logits_match_at_tp2_and_pp2(converted, reference_logits, tmp_path):
    from phoenix.testing.distributed import run_distributed

    paths = {kind: r["out"] for kind, r in converted.items()}
    ranks = run_distributed(parallel_logits, 2, paths, str(tmp_path))
    for (layout, kind), logits in ranks[1].items():  # rank 1: TP rank 1 / the last stage
        err = (logits - reference_logits[kind]).abs().max().item()
        print(f"{kind} {layout} max |logit error| {err:.3g}")
        assert err <= LOGIT_TOL, (layout, kind, err)
    for kind in CASES:  # both TP ranks gathered the same logits
        assert torch.equal(ranks[0][("tp2", kind)], ranks[1][("tp2", kind)])


def _tensors(folder: str) -> dict:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(glob.glob(os.path.join(folder, "*.safetensors"))):
        out.update(load_file(f))
    return out


@pytest.mark.slow
@pytest.mark.parametrize("kind", list(CASES))
def test_round_trip_is_bit_exact_and_loads_in_transformers(converted, hf_models, reference_logits,
                                                          kind):
    from transformers import AutoModelForCausalLM

    from phoenix.convert.hf_config import rope_from_hf

    _, dirs = hf_models
    exported = converted[kind]["exported"]
    source, back = _tensors(dirs[kind]), _tensors(exported)
    assert sorted(source) == sorted(back)
    for name in source:
        assert source[name].dtype == back[name].dtype and torch.equal(source[name], back[name]), name
    index = json.loads(open(os.path.join(exported, "model.safetensors.index.json")).read())
    assert set(index["weight_map"]) == set(source) and len(set(index["weight_map"].values())) > 1
    config = json.loads(open(os.path.join(exported, "config.json")).read())
    original = json.loads(open(os.path.join(dirs[kind], "config.json")).read())
    assert config["architectures"] == original["architectures"]
    # the same RoPE (yarn's defaults beta_fast/beta_slow/truncate are written out)
    assert rope_from_hf(config) == rope_from_hf(original)
    assert original["rope_parameters"].items() <= config["rope_parameters"].items()
    assert config["rope_theta"] == original["rope_parameters"]["rope_theta"]  # legacy keys too
    model = AutoModelForCausalLM.from_pretrained(exported, attn_implementation="eager").eval()
    with torch.no_grad():
        assert torch.equal(model(tokens()).logits, reference_logits[kind])


@pytest.mark.slow
def test_imported_checkpoint_trains_through_init_from(converted, tiny_data, tmp_path):
    from phoenix.testing.distributed import run_distributed
    from phoenix.testing.tiny import tiny_config_dict
    from phoenix.testing.workers import train_and_record

    out = converted["qwen2"]["out"]
    config = tiny_config_dict(tiny_data, tmp_path / "run",
                              model={"preset": os.path.join(out, "model.yaml")},
                              data={"seq_length": 32}, train={"steps": 2, "global_batch_size": 4},
                              optim={"warmup_steps": 1, "lr": 1e-3},
                              checkpoint={"init_from": out, "save_at_end": False})
    (result,) = run_distributed(train_and_record, 1, config)
    losses = [s["loss"] for s in result["steps"]]
    assert result["step"] == 2 and all(map(lambda v: v == v and v < 20, losses)), losses
