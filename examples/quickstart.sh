#!/usr/bin/env bash
# Phoenix quickstart on CPU: corpus -> tokenizer -> .bin/.idx -> torchrun pretraining
# (2 processes, pipeline parallel) -> resume from the checkpoint for the last steps.
# Usage: examples/quickstart.sh [PYTHON]   (default: .venv/bin/python)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${1:-.venv/bin/python}
RUN=runs/quickstart
DATA=$RUN/data
export OMP_NUM_THREADS=1
mkdir -p "$DATA"

say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

say "1-3/6 synthetic corpus, sentencepiece tokenizer, .bin/.idx (examples/prepare_tiny_data.sh)"
examples/prepare_tiny_data.sh "$PY"

say "4/6 build the data plan upstream (exact per-batch mixture, whole repositories, math bursts)"
$PY -m phoenix.cli build-plan configs/quickstart.yaml

TORCHRUN="$PY -m torch.distributed.run --standalone --nproc_per_node 2"
say "5/6 pretrain 30 of 40 steps (torchrun, 2 processes, PP=2), checkpoint every 10"
$TORCHRUN -m phoenix.train configs/quickstart.yaml train.stop_at_step=30

say "6/6 resume from the latest checkpoint and finish the run"
$TORCHRUN -m phoenix.train configs/quickstart.yaml

latest=$(cat $RUN/checkpoints/latest)
cat <<MSG

Done.
  checkpoints : $RUN/checkpoints/ (latest: $latest)
  TensorBoard : $RUN/tensorboard/quickstart/ (the run is named by the recipe's name)
  config      : $RUN/config.yaml
  spikes      : $RUN/spikes.jsonl (if any step spiked)
Open TensorBoard with:
  $(dirname $PY)/tensorboard --logdir $RUN/tensorboard
MSG
