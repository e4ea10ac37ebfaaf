"""Which megatron fused kernels the TransformerConfig asks for, by device and packages, and
what the compiled ones compute on CPU.

Found on a lent H200: megatron-core's wheel ships no scale-mask-softmax kernels, so with
``masked_softmax_fusion`` on, the first forward on CUDA died importing
``scaled_masked_softmax_cuda``. The fusion is asked for only when those kernels import.
"""

from types import SimpleNamespace

import pytest
import torch

from phoenix.config import build_config
from phoenix.model import builder
from phoenix.runtime import capabilities

from tests.config.test_config import base


def _layout(device: str):
    return SimpleNamespace(device=torch.device(device), tp_size=1, pp_size=1, ep_size=1,
                           etp_size=1)


@pytest.mark.parametrize("kernels,document_mask,device,expected", [
    (False, False, "cuda", False),   # megatron-core alone (the H200 finding)
    (True, False, "cuda", True),     # Megatron-LM / apex kernels installed
    (True, True, "cuda", False),     # the fused causal softmax would ignore the document mask
    (True, False, "cpu", False),
])
def test_masked_softmax_fusion_only_with_its_kernels(monkeypatch, kernels, document_mask,
                                                     device, expected):
    monkeypatch.setattr(builder, "megatron_softmax_kernels_available", lambda: kernels)
    cfg = build_config(base(), [f"data.document_mask={str(document_mask).lower()}"])
    assert builder.transformer_config(cfg, _layout(device)).masked_softmax_fusion is expected


def test_softmax_kernels_are_not_part_of_megatron_core():
    """The probe itself: these modules do not exist in this (megatron-core only) setup."""
    capabilities.megatron_softmax_kernels_available.cache_clear()
    assert capabilities.megatron_softmax_kernels_available() is False


# ------------------------------------------------------------- compiled fusions on CPU

def _fusions_vs_eager(out_dir: str) -> dict:
    """Loss and gradients of the tiny model with megatron's compiled SwiGLU fusion
    (model.fusions.bias_activation) and with the native fused cross entropy (set on the
    built model's config: phoenix refuses it for fp32 runs), each against the eager ops
    from the same weights; relative differences. The vocabulary (250) is padded (to 256):
    the padded columns' -inf logits (phoenix.model.vocab_mask) pass both cross entropies."""
    from phoenix.model import build_model
    from phoenix.runtime import init_runtime
    from phoenix.testing.tiny import TinyData, tiny_config

    files = TinyData("/unused/tokenizer.model", {"web": "/unused/web", "code": "/unused/code"})
    g = torch.Generator().manual_seed(1)
    tokens, labels = torch.randint(0, 250, (2, 2, 32), generator=g)
    layout, runs = None, {}
    for name, overrides in {"eager": [], "swiglu": ["model.fusions.bias_activation=true"],
                            "cross_entropy": []}.items():
        cfg = tiny_config(files, out_dir, overrides)
        layout = layout or init_runtime(cfg)
        torch.manual_seed(0)
        gpt = build_model(cfg, layout, 250, wrap_ddp=False)[0]
        assert gpt.config.bias_activation_fusion is (name == "swiglu")
        gpt.config.cross_entropy_loss_fusion = name == "cross_entropy"
        t, lab = tokens.to(layout.device), labels.to(layout.device)
        loss = gpt(t, torch.arange(32, device=layout.device)[None].expand(2, 32), None,
                   labels=lab).sum()
        loss.backward()
        runs[name] = (loss.item(), {n: p.grad for n, p in gpt.named_parameters()})
    ref_loss, ref_grads = runs.pop("eager")
    return {name: {"loss": abs(loss - ref_loss) / abs(ref_loss),
                   "grad": max(((grads[n] - r).abs().max() / r.abs().max()).item()
                               for n, r in ref_grads.items())}
            for name, (loss, grads) in runs.items()}


@pytest.mark.slow
def test_compiled_fusions_on_cpu(tmp_path):
    """The SwiGLU fusion (torch.compile on CPU) trains as the eager ops do. The native
    fused cross entropy gives the same loss but rounds the logits gradient to bf16
    (megatron-core 0.16.1): why it is refused unless train.precision is bf16."""
    from phoenix.testing.distributed import run_distributed

    (d,) = run_distributed(_fusions_vs_eager, 1, str(tmp_path))
    assert d["swiglu"]["loss"] <= 1e-6 and d["swiglu"]["grad"] <= 1e-5, d
    assert d["cross_entropy"]["loss"] <= 1e-6, d
    assert 1e-5 < d["cross_entropy"]["grad"] <= 2 ** -8, d  # bf16: 8 significant bits
