"""Model FLOPs per token against hand counts, the GPU peak table, and the tags that
ThroughputMonitor writes (with a stand-in trainer: no processes, no model)."""

import math
from types import SimpleNamespace

import pytest
import torch

from phoenix.monitor.base import MetricsCollector, StepMetrics
from phoenix.monitor.tensorboard import TensorBoardLogger
from phoenix.monitor.throughput import (ThroughputMonitor, default_peak_tflops,
                                        model_flops_per_token)


def _model(**kw):
    return SimpleNamespace(**{"num_query_groups": None, "activation": "swiglu", **kw})


# -- FLOPs: hand counts from the matrix shapes -----------------------------------------
def test_flops_tiny_swiglu_gqa():
    """configs/model/tiny.yaml: L=4, h=64, f=176, 4 heads of d=16, 2 KV groups, SwiGLU;
    s=64, padded vocab 512."""
    cfg = _model(num_layers=4, hidden_size=64, ffn_hidden_size=176, num_attention_heads=4,
                 num_query_groups=2, activation="swiglu")
    # Per layer, multiply-accumulates per token, matrix by matrix:
    q = 64 * (4 * 16)          # 4096
    k = 64 * (2 * 16)          # 2048  (GQA: 2 groups)
    v = 64 * (2 * 16)          # 2048
    o = (4 * 16) * 64          # 4096
    gate = 64 * 176            # 11264
    up = 64 * 176              # 11264
    down = 176 * 64            # 11264
    scores = 4 * 64 * 16       # Q K^T: each of 4 heads, 64 keys x 16 dims (full square)
    values = 4 * 64 * 16       # A V
    per_layer = q + k + v + o + gate + up + down + scores + values   # 54272
    logits = 64 * 512          # 32768
    forward_macs = 4 * per_layer + logits                             # 249856
    want = 3 * 2 * forward_macs                                       # 1499136
    assert want == 1_499_136
    assert model_flops_per_token(cfg, 64, 512) == want
    assert model_flops_per_token(cfg, 64, 512, training=False) == want / 3
    # Causal convention: half of the score/value square.
    causal = 3 * 2 * (4 * (per_layer - (scores + values) // 2) + logits)
    assert model_flops_per_token(cfg, 64, 512, causal=True) == causal


def test_flops_gelu_multi_head_matches_palm():
    """A 1.3B-ish GeLU model with multi-head attention: L=24, h=2048, f=8192, 16 heads
    (d=128), s=2048, V=50304 — by hand, and PaLM's 6N + 12 L H Q T."""
    cfg = _model(num_layers=24, hidden_size=2048, ffn_hidden_size=8192, num_attention_heads=16,
                 num_query_groups=None, activation="gelu")
    qkv = 2048 * (3 * 16 * 128)                    # 12,582,912
    o = (16 * 128) * 2048                          # 4,194,304
    fc1 = 2048 * 8192                              # 16,777,216
    fc2 = 8192 * 2048                              # 16,777,216
    attn = 2 * (16 * 2048 * 128)                   # scores + values: 8,388,608
    logits = 2048 * 50304                          # 103,022,592
    want = 3 * 2 * (24 * (qkv + o + fc1 + fc2 + attn) + logits)
    assert model_flops_per_token(cfg, 2048, 50304) == want
    n_params = 24 * (4 * 2048 ** 2 + 2 * 2048 * 8192) + 2048 * 50304  # matmul weights
    palm = 6 * n_params + 12 * 24 * 16 * 128 * 2048
    assert want == palm


def test_flops_moe_counts_active_experts_only():
    cfg = _model(num_layers=2, hidden_size=64, ffn_hidden_size=176, num_attention_heads=4,
                 num_query_groups=2)
    dense = model_flops_per_token(cfg, 64, 512)
    moe = model_flops_per_token(cfg, 64, 512, num_experts=8, top_k=2, moe_ffn_hidden_size=32)
    # Per layer the dense MLP (3*64*176) becomes 2 active experts (2*3*64*32) + router 64*8.
    assert dense - moe == 3 * 2 * 2 * (3 * 64 * 176 - (2 * 3 * 64 * 32 + 64 * 8))
    # top_k == num_experts == 1 with the same width is the dense MLP plus the router.
    one = model_flops_per_token(cfg, 64, 512, num_experts=1, top_k=1)
    assert one - dense == 3 * 2 * 2 * 64
    with pytest.raises(ValueError):
        model_flops_per_token(cfg, 64, 512, num_experts=4, top_k=5)


def test_flops_of_a_real_model_config():
    """ModelConfig is accepted as is (num_query_groups, activation read from it)."""
    from phoenix.config.schema import ModelConfig

    m = ModelConfig(num_layers=4, hidden_size=64, ffn_hidden_size=176, num_attention_heads=4,
                    num_query_groups=2, max_seq_length=256)
    assert model_flops_per_token(m, 64, 512) == 1_499_136


# -- peak table ------------------------------------------------------------------------
@pytest.mark.parametrize("name, precision, peak", [
    ("NVIDIA H100 80GB HBM3", "bf16", 989.0),
    ("NVIDIA H200", "bf16", 989.0),
    ("NVIDIA H100 PCIe", "bf16", 756.0),
    ("NVIDIA A100-SXM4-80GB", "fp16", 312.0),
    ("NVIDIA H100 80GB HBM3", "fp32", None),   # no default for fp32 training
    ("Some Future GPU", "bf16", None),
    (None, "bf16", None),                      # CPU
])
def test_default_peak(name, precision, peak):
    assert default_peak_tflops(name, precision) == peak


# -- the monitor -----------------------------------------------------------------------
class FakeWriter:
    def __init__(self):
        self.scalars = {}

    def add_scalar(self, tag, value, step):
        self.scalars.setdefault(tag, []).append((step, float(value)))


def _fake_trainer(world=4, logging_rank=True, steps=5):
    tb = TensorBoardLogger("/nonexistent")  # the sink, writing to a fake writer
    tb.writer = FakeWriter()
    cfg = SimpleNamespace(train=SimpleNamespace(steps=steps, global_batch_size=8, precision="fp32"),
                          data=SimpleNamespace(seq_length=64))
    layout = SimpleNamespace(world_size=world, is_logging_rank=logging_rank,
                             device=torch.device("cpu"))
    stage = SimpleNamespace(seq_length=64, tokens_per_step=8 * 64)
    return SimpleNamespace(cfg=cfg, layout=layout, state=SimpleNamespace(step=0), callbacks=[tb],
                           stages=SimpleNamespace(stage_at=lambda step: stage, explicit=False)), tb


def _metrics(step, step_time=2.0):
    return StepMetrics(step=step, loss=1.0, lr=1e-3, grad_norm=1.0, tokens=500,
                       consumed_samples=8 * step, consumed_tokens=500 * step, step_time=step_time,
                       data_time=0.25, forward_backward_time=1.5, optimizer_time=0.2,
                       callbacks_time_prev_step=0.05)


def _run(monitor, trainer, steps):
    monitor.on_train_start(trainer)
    for s in range(1, steps + 1):
        trainer.metrics = MetricsCollector(s, last_step=trainer.cfg.train.steps)
        monitor.on_step_end(trainer, _metrics(s))
        for sink in trainer.callbacks:  # as the trainer does after every on_step_end
            sink.log_metrics(trainer, trainer.metrics)


def test_monitor_tags_and_values():
    trainer, tb = _fake_trainer(world=4)
    mon = ThroughputMonitor(interval=2, peak_tflops=100.0, flops_per_token=1.5e9)
    _run(mon, trainer, 5)
    got = tb.writer.scalars
    assert sorted(got) == sorted([
        "3_throughput/tokens_per_sec_per_gpu", "3_throughput/forward_backward_time",
        "3_throughput/optimizer_time", "3_throughput/logging_time", "3_throughput/tflops_per_gpu",
        "3_throughput/mfu"])
    # The TensorBoard logger's own tags are not written twice.
    assert not {"3_throughput/tokens_per_sec", "3_throughput/step_time",
                "3_throughput/data_time"} & set(got)
    for tag, values in got.items():
        assert [s for s, _ in values] == [2, 4, 5], tag  # every 2 steps and the last
    v = {tag: values[-1][1] for tag, values in got.items()}
    assert v["3_throughput/tokens_per_sec_per_gpu"] == 500 / 2.0 / 4
    assert v["3_throughput/forward_backward_time"] == 1.5
    assert v["3_throughput/optimizer_time"] == pytest.approx(0.2)
    assert v["3_throughput/logging_time"] == pytest.approx(0.05)
    tflops = 1.5e9 * 8 * 64 / 2.0 / 4 / 1e12   # flops/token x tokens / s / GPUs
    assert math.isclose(v["3_throughput/tflops_per_gpu"], tflops, rel_tol=1e-12)
    assert math.isclose(v["3_throughput/mfu"], tflops / 100.0, rel_tol=1e-12)
    assert mon.last["3_throughput/mfu"] == v["3_throughput/mfu"]


def test_no_mfu_on_cpu_without_peak_and_no_logging_time_at_first_step():
    trainer, tb = _fake_trainer(world=1)
    mon = ThroughputMonitor(interval=1, flops_per_token=1e9)
    _run(mon, trainer, 2)
    got = tb.writer.scalars
    assert "3_throughput/mfu" not in got
    assert not any(t.startswith("memory/") for t in got)  # CPU: no CUDA memory stats
    assert [s for s, _ in got["3_throughput/tflops_per_gpu"]] == [1, 2]
    assert [s for s, _ in got["3_throughput/logging_time"]] == [2]  # step 1 has no previous


def test_only_the_logging_rank_writes():
    trainer, tb = _fake_trainer(logging_rank=False)
    _run(ThroughputMonitor(interval=1, flops_per_token=1e9), trainer, 3)
    assert tb.writer.scalars == {}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_memory_tags_on_gpu():
    trainer, tb = _fake_trainer(world=1)
    trainer.layout.device = torch.device("cuda", torch.cuda.current_device())
    trainer.cfg.train.precision = "bf16"
    x = torch.empty(256 * 1024 ** 2, dtype=torch.uint8, device="cuda")  # 0.25 GiB
    mon = ThroughputMonitor(interval=1, flops_per_token=1e9)
    _run(mon, trainer, 1)
    v = mon.last
    assert v["memory/allocated_gb"] >= 0.25 and v["memory/reserved_gb"] >= v["memory/allocated_gb"]
    assert v["memory/max_allocated_gb"] >= v["memory/allocated_gb"]
    if default_peak_tflops(torch.cuda.get_device_name(), "bf16"):
        assert "3_throughput/mfu" in v
    del x


def test_flops_of_moe_presets_by_hand():
    """model.moe: dense and MoE layers from layer_freq, shared experts, active experts."""
    from phoenix.config import build_config

    from tests.config.test_config import base

    m = build_config(base(model={"preset": "moe_deepseek_style"})).model
    L, h, d, f_dense, f_e, shared, E, k = 28, 2048, 128, 10944, 1408, 2816, 64, 6
    attn = h * (16 * d + 2 * 16 * d) + 16 * d * h
    mlp = 3 * h * f_dense + 27 * (k * 3 * h * f_e + 3 * h * shared + h * E)  # layer 0 dense
    forward = 2 * (L * attn + mlp) + 2 * L * (2 * 4096 * 16 * d) + 2 * h * 102400
    assert model_flops_per_token(m, 4096, 102400) == 3 * forward


def test_monitor_counts_moe_flops_from_the_model_config():
    """ThroughputMonitor hands the run's ModelConfig to the FLOPs count, so model.moe is
    read: tiny_moe counts top-2 of 4 experts of width 64 (+ the router), by hand."""
    from phoenix.config import build_config

    from tests.config.test_config import base

    trainer, tb = _fake_trainer(world=2)
    trainer.cfg.model = build_config(base(model={"preset": "tiny_moe"})).model
    trainer.gpt_models = [SimpleNamespace(vocab_size=512)]
    _run(ThroughputMonitor(interval=1), trainer, 1)
    L, h, d, n_q, n_kv, E, k, f, s, V = 4, 64, 16, 4, 2, 4, 2, 64, 64, 512
    attn = h * (n_q * d + 2 * n_kv * d) + n_q * d * h
    moe_mlp = k * 3 * h * f + h * E
    forward = 2 * L * (attn + moe_mlp) + 2 * L * (2 * s * n_q * d) + 2 * h * V
    tflops = 3 * forward * 8 * 64 / 2.0 / 2 / 1e12
    (step, value), = tb.writer.scalars["3_throughput/tflops_per_gpu"]
    assert step == 1 and math.isclose(value, tflops, rel_tol=1e-12)
