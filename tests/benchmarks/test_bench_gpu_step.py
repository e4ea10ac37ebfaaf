"""benchmarks/bench_gpu_step.py on CPU (the form gpu_check.sh runs on a GPU): every
``name=value`` line it promises is printed, the phoenix variant runs with its monitors
on, and the trainer trains exactly as the bare megatron-core loop on the same data."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PER_VARIANT = ("callbacks", "step_ms", "tokens_per_s", "mfu", "peak_memory_gib", "data_ms",
               "forward_backward_ms", "optimizer_ms", "callbacks_ms", "other_ms", "first_loss",
               "last_loss", "losses_finite", "skipped_steps")


@pytest.mark.slow
def test_bench_gpu_step_cpu_prints_every_promised_key():
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # --peak-tflops: a CPU has no known peak; given one, the mfu lines are printed too.
    # --attention-backend unfused,sdpa: megatron_core and phoenix again with sdpa.
    proc = subprocess.run(
        [sys.executable, "benchmarks/bench_gpu_step.py", "--device", "cpu", "--steps", "2",
         "--warmup", "1", "--peak-tflops", "1.0", "--attention-backend", "unfused,sdpa"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    values = dict(line.split("=", 1) for line in proc.stdout.splitlines() if "=" in line)
    assert not [k for k in values if k.endswith("_error")], proc.stdout

    for key in ("device", "torch", "megatron_core", "preset", "seq_length", "precision",
                "spec", "attention", "flops_per_token", "peak_tflops", "memory_measure"):
        assert key in values, key
    assert values["preset"] == "tiny" and values["precision"] == "fp32"
    assert values["attention"] == "unfused"
    variants = ("megatron_core", "phoenix", "megatron_core_loader", "megatron_core_sdpa",
                "phoenix_sdpa")
    assert "megatron_core_loader_sdpa_step_ms" not in values  # the data path: once
    for v in variants:
        assert values[f"{v}_attention"] == ("sdpa" if v.endswith("_sdpa") else "unfused"), v
    for ratio in ("megatron_core_sdpa_vs_megatron_core", "phoenix_sdpa_vs_phoenix",
                  "phoenix_sdpa_vs_megatron_core_sdpa"):
        assert float(values[ratio]) > 0, ratio
    # The same math: sdpa trains as unfused does (fp32 CPU).
    for v in ("megatron_core", "phoenix"):
        for k in ("first_loss", "last_loss"):
            assert abs(float(values[f"{v}_sdpa_{k}"]) - float(values[f"{v}_{k}"])) <= 1e-4
    missing = [f"{v}_{k}" for v in variants for k in PER_VARIANT if f"{v}_{k}" not in values]
    assert not missing, missing
    for v in variants:
        assert float(values[f"{v}_tokens_per_s"]) > 0
        assert values[f"{v}_losses_finite"] == "True"
    for ratio in ("phoenix_vs_megatron_core", "megatron_core_loader_vs_megatron_core",
                  "phoenix_vs_megatron_core_loader"):
        assert float(values[ratio]) > 0, ratio

    # The monitored variant really runs the monitors, and writes TensorBoard events.
    callbacks = values["phoenix_callbacks"].split(",")
    for name in ("NormMonitor", "DatasetLossMonitor", "ThroughputMonitor", "TensorBoardLogger"):
        assert name in callbacks, callbacks
    assert int(values["phoenix_tensorboard_event_files"]) >= 1
    assert values["megatron_core_callbacks"] == "none"
    # Same weights, data, LR schedule: the Trainer's losses are the bare loop's (fp32 CPU).
    assert float(values["phoenix_loss_max_rel_diff_vs_loader"]) < 1e-5
