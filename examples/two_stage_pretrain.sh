#!/usr/bin/env bash
# Two-stage pretraining in one job on CPU (configs/recipes/two_stage_pretrain.yaml):
# plot the LR schedule with its stage boundaries, build every stage's data plan, then
# train through both stages with torchrun (2 processes: data parallel).
# Usage: examples/two_stage_pretrain.sh [PYTHON]   (default: .venv/bin/python)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${1:-.venv/bin/python}
RECIPE=configs/recipes/two_stage_pretrain.yaml
export OMP_NUM_THREADS=1

examples/prepare_tiny_data.sh "$PY"
$PY -m phoenix.cli lr-plot $RECIPE --out runs/two_stage/lr_plot
$PY -m phoenix.cli build-plan $RECIPE
$PY -m torch.distributed.run --standalone --nproc_per_node 2 -m phoenix.train $RECIPE
echo "TensorBoard: $(dirname $PY)/tensorboard --logdir runs/two_stage/tensorboard"
