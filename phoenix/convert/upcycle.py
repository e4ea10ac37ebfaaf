"""``phoenix upcycle DENSE_CKPT MOE_CONFIG OUT``: a dense phoenix checkpoint as a MoE one.

The weights are mapped by :mod:`phoenix.model.upcycling` (experts copied or cut out of
the dense MLP and scaled, router initialised as megatron does, everything else copied;
dense layers of a mixed ``moe.layer_freq`` pattern stay dense). Output folder (written as
``.tmp-OUT-*`` and renamed when complete)::

    OUT/checkpoints/step_000000/   the weights (dist_checkpointing, TP=PP=EP=1, reshardable)
    OUT/checkpoints/latest
    OUT/model.yaml                 the MoE model section (use as ``model.preset``)
    OUT/upcycle.json               provenance: source, granularity, scale, exact or not

Continue training with ``checkpoint.init_from: OUT`` (a fresh optimizer) at any TP/PP/EP:
dist_checkpointing reshards the experts on load. Runs in one process on CPU.

MOE_CONFIG is a recipe (its ``model`` section is used, ``train.seed`` seeds the router)
or a model preset file; ``key=value`` overrides apply to it (``model.moe.ffn_hidden_size=88``).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Optional, Sequence

import torch
import yaml

from phoenix.convert.common import atomic_output, conversion_config, one_process_runtime
from phoenix.model.upcycling import UpcycleError, UpcycleSpec, granularity, upcycled_tensors

log = logging.getLogger(__name__)

# Model fields that fix the non-expert shapes (and the function) of the two models.
SHARED_FIELDS = ("num_layers", "hidden_size", "num_attention_heads", "num_query_groups",
                 "ffn_hidden_size", "normalization", "activation", "position_embedding",
                 "tie_embeddings", "add_bias_linear", "add_qkv_bias", "qk_layernorm")


def moe_model_section(moe_config: str | Path, overrides: Sequence[str] = ()) -> tuple[dict, int]:
    """The ``model`` section of MOE_CONFIG (a recipe, or a bare model preset file) with
    the overrides applied, and the router seed (the recipe's ``train.seed``, else 1234)."""
    from phoenix.config.loader import parse_overrides, read_yaml, resolve_model_preset
    from phoenix.config.typed import apply_override

    data = read_yaml(moe_config)
    if "model" not in data:  # a model preset: its keys are the model section
        data = {"model": data}
    for key, value in parse_overrides(overrides):
        apply_override(data, key, value)
    model = data["model"]
    if not isinstance(model, dict):
        raise UpcycleError(f"{moe_config}: model must be a mapping")
    if model.get("preset"):  # resolved here: the output's model.yaml is self-contained
        preset = read_yaml(resolve_model_preset(model["preset"]))
        merged = {**preset, **model}
        if isinstance(preset.get("moe"), dict) and isinstance(model.get("moe"), dict):
            merged["moe"] = {**preset["moe"], **model["moe"]}
        model = merged
    model.pop("preset", None)
    return model, int((data.get("train") or {}).get("seed", 1234))


def _value(model, name):
    if name == "num_query_groups":
        return model.num_query_groups or model.num_attention_heads
    return getattr(model, name)


def check_shapes(dense, moe, dense_vocab: int, moe_vocab: int, where: str) -> None:
    """One-line UpcycleError naming every model field in which the MoE config differs from
    the dense checkpoint outside the experts."""
    from phoenix.model.builder import padded_vocab_size

    diffs = [f"{n} {_value(dense, n)} (dense) vs {_value(moe, n)} (MoE config)"
             for n in SHARED_FIELDS if _value(dense, n) != _value(moe, n)]
    rows = [padded_vocab_size(v, m.make_vocab_size_divisible_by, 1)
            for v, m in ((dense_vocab, dense), (moe_vocab, moe))]
    if dense_vocab != moe_vocab or rows[0] != rows[1]:
        diffs.append(f"vocab_size {dense_vocab} padded to {rows[0]} (dense) vs {moe_vocab} "
                     f"padded to {rows[1]} (MoE config)")
    if diffs:
        raise UpcycleError(f"{where} does not match the MoE config outside the experts: "
                           + "; ".join(diffs))


def _dense_vocab(saved, path: Path, embed_rows: Optional[int]) -> int:
    """The dense run's vocabulary: model.vocab_size, else its tokenizer's, else the rows."""
    from phoenix.tokenizer import model_vocab_size

    try:
        return model_vocab_size(saved)
    except (OSError, ValueError, RuntimeError) as e:
        if embed_rows is None:
            raise UpcycleError(f"{path}: model.vocab_size is not set and the tokenizer cannot "
                               f"be read ({e})") from None
        log.warning("upcycle: tokenizer unreadable (%s); vocab = the %d embedding rows", e, embed_rows)
        return embed_rows


def init_routers(model, seed: int) -> None:
    """megatron's own router initialisation (``Router.reset_parameters``: the config's
    ``init_method``), seeded: the model was built with ``initialize=False``."""
    from megatron.core.transformer.moe.router import Router

    torch.manual_seed(seed)
    for module in model.modules():
        if isinstance(module, Router):
            before = module.config.perform_initialization
            module.config.perform_initialization = True
            try:
                module.reset_parameters()
            finally:
                module.config.perform_initialization = before


def upcycle(dense_ckpt: str | Path, moe_config: str | Path, out: str | Path, *,
            overrides: Sequence[str] = (), seed: Optional[int] = None) -> Path:
    """Write the MoE checkpoint folder ``out`` from the dense checkpoint ``dense_ckpt`` (a
    checkpoint folder, or a run folder whose latest is taken). Returns ``out``.

    Raises UpcycleError (or ConfigError / CheckpointError) naming what does not fit."""
    from megatron.core.dist_checkpointing import load_tensors_metadata

    from phoenix.checkpoint import CheckpointStore, load_model
    from phoenix.checkpoint.store import resolve_checkpoint
    from phoenix.config import dump_config
    from phoenix.config.loader import load_saved_config
    from phoenix.config.typed import to_dict
    from phoenix.model import build_model

    path = resolve_checkpoint(dense_ckpt)
    saved = load_saved_config(path / "config.yaml")
    if saved.model.moe is not None:
        raise UpcycleError(f"{path} is already a MoE checkpoint (model.moe is set in its "
                           f"config.yaml); upcycling starts from a dense one")
    meta = load_tensors_metadata(str(path))
    embed = meta.get("embedding.word_embeddings.weight")
    stored = (embed or next(iter(meta.values()))).dtype
    vocab = _dense_vocab(saved, path, None if embed is None else embed.global_shape[0])
    moe_model, router_seed = moe_model_section(moe_config, overrides)
    moe_model.setdefault("vocab_size", vocab)
    dense_model = {k: v for k, v in to_dict(saved.model).items() if k != "preset"}
    dense_model["vocab_size"] = vocab
    tokenizer = to_dict(saved.tokenizer)
    moe_cfg = conversion_config(moe_model, tokenizer, out)
    dense_cfg = conversion_config(dense_model, tokenizer, out)
    moe = moe_cfg.model.moe
    if moe is None:
        raise UpcycleError(f"{moe_config}: no model.moe section (not a MoE config)")
    if moe.shared_expert_intermediate_size is not None:
        raise UpcycleError(f"{moe_config}: model.moe.shared_expert_intermediate_size is set; "
                           f"shared experts are not upcycled (no dense weights to give them)")
    check_shapes(dense_cfg.model, moe_cfg.model, vocab, moe_cfg.model.vocab_size,
                 f"dense checkpoint {path}")
    dense_ffn = dense_cfg.model.ffn_hidden_size
    g = granularity(dense_ffn, moe.expert_ffn_hidden_size(dense_ffn), moe.num_experts)
    spec = UpcycleSpec(num_experts=moe.num_experts, router_topk=moe.router_topk, granularity=g,
                       gated=moe_cfg.model.activation == "swiglu",
                       score_function=moe.router_score_function, pre_softmax=moe.router_pre_softmax,
                       dropless=moe.capacity_factor is None)
    seed = router_seed if seed is None else seed
    with atomic_output(out) as tmp:
        with one_process_runtime(moe_cfg) as layout:
            (dense_gpt,) = load_model(path, dense_cfg, layout, vocab_size=vocab, dtype=stored,
                                      initialize=False)
            (moe_gpt,) = build_model(moe_cfg, layout, vocab, wrap_ddp=False, initialize=False,
                                     dtype=stored)
            init_routers(moe_gpt, seed)
            target = {k: v for k, v in moe_gpt.state_dict().items() if not k.endswith("_extra_state")}
            dense = {k: v for k, v in dense_gpt.state_dict().items() if not k.endswith("_extra_state")}
            for key, value in upcycled_tensors(dense, target, spec):
                target[key].copy_(value)
            del dense_gpt, dense
            manager = CheckpointStore(tmp / "checkpoints", layout.rank, layout.world_size)
            manager.save(0, [moe_gpt], None, {"format": 2, "step": 0, "states": {}},
                         dump_config(moe_cfg))
        model_yaml = {k: v for k, v in to_dict(moe_cfg.model).items() if k != "preset"}
        (tmp / "model.yaml").write_text(
            f"# Upcycled from {path.resolve()} by phoenix upcycle.\n"
            + yaml.safe_dump(model_yaml, sort_keys=False))
        info = {"source": str(path.resolve()), "moe_config": str(moe_config),
                "overrides": list(overrides), "dtype": str(stored).replace("torch.", ""),
                "num_experts": moe.num_experts, "router_topk": moe.router_topk,
                "moe_layers": moe.moe_layers(moe_cfg.model.num_layers), "granularity": g,
                "activation_scale": spec.activation_scale, "weight_scale": spec.weight_scale,
                "exact": spec.exact, "router_seed": seed,
                "use": {"checkpoint.init_from": str(out), "model.preset": str(Path(out) / "model.yaml")}}
        (tmp / "upcycle.json").write_text(json.dumps(info, indent=2) + "\n")
    log.info("upcycle: g=%d, weight scale %.4f, %s", g, spec.weight_scale,
             "exact" if spec.exact else "approximate")
    return Path(out)
