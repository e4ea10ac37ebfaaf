#!/usr/bin/env bash
# Continual pretraining from the two-stage run's checkpoint on CPU
# (configs/recipes/continual_pretrain.yaml): new data with replay, a mixture warmup,
# a re-warmed LR and a short freeze of everything but the embeddings. The source run is
# only read. Runs examples/two_stage_pretrain.sh first if its checkpoint is missing.
# Usage: examples/continual_pretrain.sh [PYTHON]   (default: .venv/bin/python)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${1:-.venv/bin/python}
RECIPE=configs/recipes/continual_pretrain.yaml
export OMP_NUM_THREADS=1

[ -f runs/two_stage/checkpoints/latest ] || examples/two_stage_pretrain.sh "$PY"
$PY -m phoenix.cli lr-plot $RECIPE --out runs/continual/lr_plot
$PY -m phoenix.cli build-plan $RECIPE
# A different layout than the source on purpose: checkpoints load at any TP/PP.
$PY -m torch.distributed.run --standalone --nproc_per_node 2 -m phoenix.train $RECIPE parallel.tensor=2
echo "TensorBoard: $(dirname $PY)/tensorboard --logdir runs/continual/tensorboard"
