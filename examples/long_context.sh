#!/usr/bin/env bash
# Context extension on CPU at tiny scale (configs/recipes/long_context.yaml): a 64-token
# stage with RoPE base 10k, then a 256-token stage with base 1M, long web documents
# upsampled and code repositories whole per batch; document mask on. The overrides below
# are the only difference from the real recipe: model size, lengths, batch sizes, steps.
# Usage: examples/long_context.sh [PYTHON] [EXTRA OVERRIDES...]   (default: .venv/bin/python)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${1:-.venv/bin/python}
shift || true
RECIPE=configs/recipes/long_context.yaml
DATA=runs/quickstart/data
export OMP_NUM_THREADS=1

TINY=(
  runtime.device=cpu model.preset=tiny model.max_seq_length=256
  tokenizer.model=$DATA/tokenizer.model
  "data.datasets[0].prefix=$DATA/web" "data.datasets[1].prefix=$DATA/web"
  "data.datasets[1].min_document_tokens=200" "data.datasets[2].prefix=$DATA/code"
  "data.datasets[2].pack_groups=2"
  data.seq_length=64 parallel.tensor=1 parallel.sequence_parallel=false
  train.global_batch_size=16 train.micro_batch_size=2
  optim.lr=3.0e-3 optim.min_lr=3.0e-4 optim.warmup_steps=3 optim.wsd_decay_steps=5
  "stages[0].steps=20" "stages[1].steps=10" "stages[1].seq_length=256"
  "stages[1].global_batch_size=8" checkpoint.save_interval=10 logging.log_interval=5
  "eval.sets[0].prefix=$DATA/heldout_web" eval.interval=10 eval.max_samples=16
  eval.needle.haystack_prefix=$DATA/heldout_web "eval.needle.lengths=[128,256]"
  eval.needle.trials=2
)

examples/prepare_tiny_data.sh "$PY"
$PY -m phoenix.cli build-plan $RECIPE "${TINY[@]}" "$@"
$PY -m torch.distributed.run --standalone --nproc_per_node 2 -m phoenix.train $RECIPE "${TINY[@]}" "$@"
OUT=runs/long_context
for arg in "$@"; do case $arg in output_dir=*) OUT=${arg#output_dir=} ;; esac; done
echo "TensorBoard: $(dirname $PY)/tensorboard --logdir $OUT/tensorboard"
