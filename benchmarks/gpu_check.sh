#!/usr/bin/env bash
# The CUDA-path checks and the GPU benchmark for one GPU (an H100 or H200, with or without
# Transformer Engine), in at most 9 minutes: every part runs under `timeout`, and no part
# needs an earlier optional one to have succeeded (only the quickstart needs its data).
# megatron-core travels as a wheel in .whl/ when the machine lacks it. Logs go to
# ${OUT:-/tmp/gpu_check}; the `name=value` lines are repeated as a summary at the end.
#   bash benchmarks/gpu_check.sh            (from anywhere; PYTHON=... picks the python)
#
# Budget (seconds, each part's timeout; `timeout -k 2` adds at most 2 s to a part cut off):
#   megatron-core wheel 35 | device + versions 25 | data-plan extension 45 |
#   quickstart data 60 | quickstart, 3 CUDA steps 70 | its TensorBoard tags 15 |
#   pytest -m gpu 110 | benchmark: what is left of 540 s (at most 240, at least ~160).
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_check}; mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=4
START=$(date +%s); DEADLINE=$((START + 540))
SUMMARY="$OUT/summary.txt"; : >"$SUMMARY"
say() { echo; echo "=== $* (t=$(( $(date +%s) - START ))s)"; }
record() { echo "$1=$2" >>"$SUMMARY"; }
# part NAME SECONDS CMD...: run CMD under a timeout; records part_NAME_rc and _s.
part() {
  local name=$1 limit=$2 t0 rc; shift 2
  t0=$(date +%s)
  timeout -k 2 "$limit" "$@"; rc=$?
  record "part_${name}_rc" "$rc"; record "part_${name}_s" "$(( $(date +%s) - t0 ))"
  [ "$rc" = 124 ] && echo "($name: timed out after ${limit}s)"
  return "$rc"
}

say "megatron-core wheel"
if ls .whl/*.whl >/dev/null 2>&1; then
  part wheel 35 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
    --upgrade --target /tmp/site .whl/*.whl >"$OUT/pip.log" 2>&1 || tail -5 "$OUT/pip.log"
  export PYTHONPATH=/tmp/site:$PWD
else
  echo "no .whl/: the machine's own megatron-core is used"
  export PYTHONPATH=$PWD
fi

say "device and library versions"
timeout -k 2 10 nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
part versions 15 "$PY" - <<'PY' | tee "$OUT/versions.txt"
import importlib.metadata as md, importlib.util as u, sys
import torch
def version(dist):
    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return "missing"
print(f"device={torch.cuda.get_device_name() if torch.cuda.is_available() else 'none'}")
print(f"python={sys.version.split()[0]}")
print(f"torch={torch.__version__}")
print(f"cuda={torch.version.cuda}")
for dist in ("megatron-core", "transformer-engine", "apex", "flash-attn", "tensorboard",
             "sentencepiece", "pytest", "pybind11"):
    print(f"{dist.replace('-', '_')}={version(dist)}")
PY
grep -E '^[a-z0-9_]+=' "$OUT/versions.txt" >>"$SUMMARY"

say "data-plan extension (csrc/) for this python"
part build_ext 45 "$PY" setup.py -q build_ext --inplace >"$OUT/build.log" 2>&1 || tail -20 "$OUT/build.log"

# The first CUDA Trainer steps: before the benchmark, so they are not lost if time runs out.
say "quickstart recipe on CUDA: 3 steps (torchrun, 1 GPU, PP=1, bf16)"
if part data_prep 60 bash examples/prepare_tiny_data.sh "$PY" >"$OUT/data_prep.log" 2>&1; then
  rm -rf runs/qs_cuda
  part quickstart 70 "$PY" -m torch.distributed.run --standalone --nproc_per_node 1 \
    -m phoenix.train configs/quickstart.yaml runtime.device=cuda parallel.pipeline=1 \
    train.stop_at_step=3 logging.log_interval=1 output_dir=runs/qs_cuda >"$OUT/quickstart.log" 2>&1
  grep -E "step +[0-9]+/|eval .*@ step|saved checkpoint|Error|error:" "$OUT/quickstart.log" | head -12
  record quickstart_steps_completed "$(grep -cE 'step +[0-9]+/40 \|' "$OUT/quickstart.log")"
  [ -d runs/qs_cuda/tensorboard/quickstart ] && part tensorboard_tags 15 "$PY" - <<'PY' | tee -a "$SUMMARY"
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
ea = EventAccumulator("runs/qs_cuda/tensorboard/quickstart", size_guidance={"scalars": 0})
ea.Reload()
tags = ea.Tags()["scalars"]
print(f"quickstart_scalar_tags={len(tags)}")
for tag in ("1_train/loss", "3_throughput/tokens_per_sec_per_gpu", "3_throughput/mfu",
            "memory/max_allocated_gb"):
    if tag in tags:
        last = ea.Scalars(tag)[-1]
        print(f"quickstart_{tag.split('/')[-1]}_step{last.step}={last.value:.4g}")
PY
else
  tail -20 "$OUT/data_prep.log"; echo "quickstart skipped: its data could not be prepared"
fi

say "pytest -m gpu"
GPU_TESTS=$(grep -rl "mark.gpu" tests --include='test_*.py' | sort)
echo "$GPU_TESTS"
part pytest_gpu 110 "$PY" -m pytest -q -p no:cacheprovider -m gpu $GPU_TESTS >"$OUT/pytest_gpu.txt" 2>&1
tail -25 "$OUT/pytest_gpu.txt"
for what in passed failed skipped error errors; do
  n=$(tail -3 "$OUT/pytest_gpu.txt" | grep -oE "[0-9]+ $what\b" | tail -1 | cut -d' ' -f1)
  [ -n "$n" ] && record "pytest_gpu_$what" "$n"
done

# 1.5b at seq 4096 in bf16: micro-batch 1 (x 8 per step) is what fits 80 GB without
# recomputation on the local spec (its unfused attention keeps the fp32 softmax output
# and a bf16 copy, 1.6 GiB per layer). Each variant runs with the unfused attention, then
# megatron_core and phoenix again with sdpa (torch's flash kernel), in the order
# megatron_core, megatron_core_sdpa, phoenix, phoenix_sdpa, megatron_core_loader: five
# runs, each printed when done, so running out of time loses the data-path run first.
# With Transformer Engine, add te to --attention-backend. Variants and lines: the script.
LEFT=$(( DEADLINE - $(date +%s) - 5 )); [ "$LEFT" -gt 240 ] && LEFT=240
say "bench_gpu_step: 1.5b, seq 4096, 8 x mbs 1, bf16; bare megatron-core vs phoenix, unfused vs sdpa (${LEFT}s)"
if [ "$LEFT" -gt 30 ]; then
  part bench "$LEFT" "$PY" benchmarks/bench_gpu_step.py --device cuda --preset 1.5b \
    --seq-length 4096 --global-batch-size 8 --micro-batch-size 1 --precision bf16 \
    --steps 8 --warmup 3 --variants megatron_core,phoenix,megatron_core_loader \
    --attention-backend unfused,sdpa \
    2>"$OUT/bench.err" | tee "$OUT/bench.txt"
  [ "${PIPESTATUS[0]}" = 0 ] || tail -30 "$OUT/bench.err"
  grep -E '^[a-z0-9_]+=' "$OUT/bench.txt" | grep -vE '^(device|torch|megatron_core|transformer_engine)=' >>"$SUMMARY"
else
  record bench skipped_no_time_left
fi

say "summary (total $(( $(date +%s) - START ))s)"
record total_s "$(( $(date +%s) - START ))"
cat "$SUMMARY"
