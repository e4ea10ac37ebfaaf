"""The CUDA path (NCCL, megatron's fused kernels, bf16) against the CPU reference.

Runs only where a CUDA GPU is visible (marked ``gpu``; CI's machines have none and
report these as skipped). ``benchmarks/gpu_check.sh`` runs them on a lent GPU. The CPU
run is the oracle: same initial weights (saved by the CPU run), same data plan, fp32
on both sides, so the GPU's losses and grad norms must match to float32 rounding.
"""

import math

import pytest
import torch

from phoenix.testing.distributed import run_distributed
from phoenix.testing.tiny import tiny_config_dict
from phoenix.testing.workers import train_and_record

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

VARIANTS = {
    "dense": [],
    "document_mask": ["data.document_mask=true"],
    "moe": ["model.preset=tiny_moe"],
}


def _cfg(tiny_data, out, **sections):
    return tiny_config_dict(tiny_data, out, train={"steps": 4}, **sections)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_cuda_fp32_matches_cpu(variant, tiny_data, tmp_path, monkeypatch):
    """Same weights and batches: the GPU (NCCL world, fused softmax / bias-dropout
    kernels, CUDA matmuls without TF32) gives the CPU's losses and grad norms."""
    overrides = VARIANTS[variant]
    cpu = _cfg(tiny_data, tmp_path / "cpu", checkpoint={"save_initial": True, "save_at_end": False})
    # The CPU reference runs in a process that sees no GPU (phoenix refuses the cpu
    # device on a CUDA machine).
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    (ref,) = run_distributed(train_and_record, 1, cpu, overrides)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    init = tmp_path / "cpu" / "checkpoints" / "step_000000"
    gpu = _cfg(tiny_data, tmp_path / "gpu", runtime={"device": "cuda"},
               checkpoint={"init_from": str(init), "save_at_end": False})
    (got,) = run_distributed(train_and_record, 1, gpu, [*overrides, "train.precision=fp32"],
                             backend="nccl")
    assert got["layout"].startswith("world=1")
    assert len(got["steps"]) == len(ref["steps"]) == 4
    for g, r in zip(got["steps"], ref["steps"]):
        assert math.isclose(g["loss"], r["loss"], rel_tol=1e-4), (variant, g, r)
        assert math.isclose(g["grad_norm"], r["grad_norm"], rel_tol=1e-3), (variant, g, r)
    assert ref["steps"][0]["loss"] != ref["steps"][-1]["loss"]


def test_cuda_bf16_resume_continues_the_run(tiny_data, tmp_path):
    """bf16 with megatron's fp32 main params: a run stopped at step 3 and resumed from
    its checkpoint gives the uninterrupted run's losses (same kernels, same batches)."""
    gpu = {"runtime": {"device": "cuda"}, "checkpoint": {"save_interval": 3, "save_at_end": False}}
    bf16 = ["train.precision=bf16"]
    (whole,) = run_distributed(train_and_record, 1, tiny_config_dict(
        tiny_data, tmp_path / "whole", train={"steps": 6}, **gpu), bf16, backend="nccl")
    split = tiny_config_dict(tiny_data, tmp_path / "split", train={"steps": 6}, **gpu)
    (first,) = run_distributed(train_and_record, 1, split, [*bf16, "train.stop_at_step=3"],
                               backend="nccl")
    (second,) = run_distributed(train_and_record, 1, split, bf16, backend="nccl")
    assert first["step"] == 3 and [s["step"] for s in second["steps"]] == [4, 5, 6]
    losses = [s["loss"] for s in first["steps"] + second["steps"]]
    for a, b in zip(losses, [s["loss"] for s in whole["steps"]]):
        assert math.isclose(a, b, rel_tol=1e-2), (losses, whole["steps"])
    assert all(math.isfinite(x) for x in losses) and losses[0] != losses[-1]
