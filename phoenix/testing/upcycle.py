"""Workers of the upcycling tests (run inside spawned ranks): upcycle a dense checkpoint and
compare the logits of the dense and the upcycled model on the same tokens."""

from __future__ import annotations

from pathlib import Path

import torch

from phoenix.config import build_config


def _load(cfg, layout, checkpoint: str):
    from phoenix.checkpoint import load_model

    (gpt,) = load_model(checkpoint, cfg, layout)
    return gpt.eval()


def _logits(gpt, tokens: torch.Tensor, vocab: int) -> torch.Tensor:
    positions = torch.arange(tokens.shape[1]).expand_as(tokens)
    with torch.no_grad():
        return gpt(tokens, positions, attention_mask=None)[..., :vocab].float()


def compare_logits(dense_config: dict, dense_ckpt: str, moe_config: dict, moe_ckpt: str,
                   tokens: list, overrides: list[str] = ()) -> dict:
    """Max |logit difference| of the two models on ``tokens`` (this rank's layout from
    ``moe_config`` + ``overrides``, e.g. ``parallel.expert=2``), and the dense logits' std."""
    from phoenix.runtime import init_runtime

    moe_cfg = build_config(moe_config, overrides)
    layout = init_runtime(moe_cfg)
    dense_cfg = build_config(dense_config)
    batch = torch.tensor(tokens)
    vocab = moe_cfg.model.vocab_size
    dense = _logits(_load(dense_cfg, layout, dense_ckpt), batch, vocab)
    moe = _logits(_load(moe_cfg, layout, moe_ckpt), batch, vocab)
    return {"max_err": float((dense - moe).abs().max()), "logit_std": float(dense.std()),
            "layout": layout.describe()}


def upcycle_and_compare(dense_config: dict, dense_ckpt: str, settings: dict, root: str,
                        tokens: list) -> dict:
    """For each ``name -> moe config dict``: write it as YAML, upcycle ``dense_ckpt`` with
    it into ``root/name`` and compare logits at TP = EP = 1 (one process, world of one)."""
    import yaml

    from phoenix.convert.upcycle import upcycle

    out = {}
    for name, moe_config in settings.items():
        recipe = Path(root) / f"{name}.yaml"
        recipe.write_text(yaml.safe_dump(moe_config))
        path = upcycle(dense_ckpt, recipe, Path(root) / name)
        out[name] = compare_logits(dense_config, dense_ckpt, moe_config, str(path), tokens)
    return out


def megatron_oracle(dense_config: dict, dense_ckpt: str, moe_config: dict, seed: int) -> dict:
    """megatron-core's own ``upcycle_state_dict`` against phoenix's on the same models (a
    uniform MoE pattern: megatron's helper cannot do mixed layers); per key, max |diff|."""
    from megatron.core.transformer.moe.upcycling_utils import upcycle_state_dict as megatron_upcycle

    from phoenix.convert.upcycle import init_routers
    from phoenix.model import build_model
    from phoenix.model.upcycling import UpcycleSpec, granularity, upcycle_state_dict
    from phoenix.runtime import init_runtime

    moe_cfg = build_config(moe_config)
    layout = init_runtime(moe_cfg)
    dense = _load(build_config(dense_config), layout, dense_ckpt)
    (moe,) = build_model(moe_cfg, layout, moe_cfg.model.vocab_size, wrap_ddp=False)
    init_routers(moe, seed)
    m = moe_cfg.model.moe
    g = granularity(moe_cfg.model.ffn_hidden_size, m.expert_ffn_hidden_size(moe_cfg.model.ffn_hidden_size),
                    m.num_experts)
    spec = UpcycleSpec(num_experts=m.num_experts, router_topk=m.router_topk, granularity=g,
                       gated=moe_cfg.model.activation == "swiglu", pre_softmax=m.router_pre_softmax)
    strip = (lambda sd: {k: v for k, v in sd.items() if not k.endswith("_extra_state")})
    theirs = strip(megatron_upcycle([moe], [dense])["model"])
    ours = upcycle_state_dict(strip(dense.state_dict()), strip(moe.state_dict()), spec)
    assert set(theirs) == set(ours), sorted(set(theirs) ^ set(ours))[:5]
    return {k: float((theirs[k].float() - ours[k].float()).abs().max()) for k in ours}
