#!/usr/bin/env bash
# The CUDA-path checks and GPU benchmarks, as one script for a machine with one GPU
# (the lent device machine: its python3 has CUDA torch but not megatron-core, which
# travels as a wheel in .whl/). Writes logs to ${OUT:-/tmp/gpu_check}; prints a summary.
#   bash benchmarks/gpu_check.sh            (from the repository root)
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_check}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=4
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
step() { echo; echo "=== $* ($(date +%T))"; }

step "machine"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv
python3 - <<'PY'
import torch, importlib.util as u
print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name())
for m in ("megatron.core", "transformer_engine", "apex", "flash_attn"):
    print(m, "importable" if u.find_spec(m.split(".")[0]) else "missing")
PY
step "build the data-plan extension for this python"
python3 setup.py -q build_ext --inplace >"$OUT/build.log" 2>&1 || { tail -20 "$OUT/build.log"; exit 1; }

step "bench_gpu_step: 400m, seq 2048, gbs 32 x mbs 8, bf16"
timeout 240 python3 benchmarks/bench_gpu_step.py --preset 400m --seq-length 2048 \
  --global-batch-size 32 --micro-batch-size 8 --steps 12 2>"$OUT/bench_400m.err" | tee "$OUT/bench_400m.txt"
[ "${PIPESTATUS[0]}" = 0 ] || tail -30 "$OUT/bench_400m.err"

step "pytest -m gpu (CUDA vs CPU parity, bf16 resume, memory tags)"
timeout 180 python3 -m pytest -q -p no:cacheprovider -m gpu -x tests/train/test_cuda_path.py \
  tests/monitor/test_throughput.py 2>&1 | tee "$OUT/pytest_gpu.txt" | tail -25

step "torchrun quickstart on cuda (bf16, PP=1) + TensorBoard tags"
{ bash examples/prepare_tiny_data.sh python3 >/dev/null 2>&1 &&
  timeout 100 python3 -m torch.distributed.run --standalone --nproc_per_node 1 -m phoenix.train \
    configs/quickstart.yaml runtime.device=cuda parallel.pipeline=1 output_dir=runs/qs_cuda \
    tokenizer.model=runs/quickstart/data/tokenizer.model; } >"$OUT/quickstart.log" 2>&1
echo "quickstart rc=$?"; grep -E "step +(10|40)/|error|Error" "$OUT/quickstart.log" | head -8
python3 - <<'PY'
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
import glob
for d in sorted(glob.glob("runs/qs_cuda/tensorboard*")):
    ea = EventAccumulator(d, size_guidance={"scalars": 0}); ea.Reload()
    tags = ea.Tags()["scalars"]
    for t in ("train/loss", "throughput/mfu", "throughput/tokens_per_sec_per_gpu", "memory/max_allocated_gb"):
        if t in tags:
            print(f"{t}={ea.Scalars(t)[-1].value:.4g}")
    print("scalar_tags", len(tags))
PY
