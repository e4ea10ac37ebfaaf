"""Which megatron fused kernels the TransformerConfig asks for, by device and packages.

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
