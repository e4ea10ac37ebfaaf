"""Config checks of document-aware training and context parallelism: each refusal names
its key, before any work."""

import pytest

from phoenix.config import ConfigError, build_config
from phoenix.runtime.capabilities import check_capabilities

from tests.config.test_config import base, key


def test_document_mask_dense_limit_on_cpu_names_the_numbers():
    d = base(data={"document_mask": True, "dense_mask_max_seq_length": 32},
             runtime={"device": "cpu"})
    with pytest.raises(ConfigError, match=key("data.document_mask: sequences of 64 tokens need a "
                                              "dense 64x64 mask per sample on CPU, above "
                                              "data.dense_mask_max_seq_length 32")):
        build_config(d)
    # A later stage counts too.
    stages = [{"steps": 5, "mixture": {"web": 1.0}},
              {"steps": 5, "mixture": {"web": 1.0}, "seq_length": 128}]
    d = base(data={"document_mask": True, "dense_mask_max_seq_length": 64,
                   "datasets": [{"prefix": "/x/web"}]}, runtime={"device": "cpu"},
             train={"steps": None, "global_batch_size": 8}, stages=stages)
    with pytest.raises(ConfigError, match=key("sequences of 128 tokens")):
        build_config(d)
    d["data"]["dense_mask_max_seq_length"] = 128
    assert build_config(d).data.document_mask


def test_dense_limit_must_be_positive():
    with pytest.raises(ConfigError, match=key("data.dense_mask_max_seq_length")):
        build_config(base(data={"dense_mask_max_seq_length": 0}))


@pytest.mark.parametrize("extra,what", [
    ({}, "context parallelism needs Transformer Engine attention on CUDA (runtime.device is cpu)"),
])
def test_context_parallel_refused_without_te(extra, what):
    cfg = build_config(base(parallel={"context": 2}, runtime={"device": "cpu"}, **extra))
    with pytest.raises(ConfigError, match=key("parallel.context: " + what)):
        check_capabilities(cfg)


def test_context_parallel_checks_on_cuda(monkeypatch):
    """With TE present (pretended), the remaining CP checks still name their key."""
    import phoenix.runtime.capabilities as caps

    monkeypatch.setattr(caps, "te_available", lambda: True)
    ok = build_config(base(parallel={"context": 2}, runtime={"device": "cuda"}))
    caps.check_capabilities(ok)
    for sections, what in [
        ({"data": {"document_mask": True}}, "not supported together with data.document_mask"),
        ({"eval": {"sets": [{"prefix": "/x/val"}]}}, "in-training eval does not split"),
        ({"data": {"seq_length": 62}}, "stage 'main' seq_length 62 is not divisible by "
                                        "2*context = 4"),
    ]:
        cfg = build_config(base(parallel={"context": 2}, runtime={"device": "cuda"}, **sections))
        with pytest.raises(ConfigError, match=key("parallel.context: " + what)):
            caps.check_capabilities(cfg)
