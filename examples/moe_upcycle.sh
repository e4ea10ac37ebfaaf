#!/usr/bin/env bash
# Dense -> MoE by upcycling on CPU (configs/recipes/moe_upcycle.yaml): train the tiny dense
# model briefly, turn it into a 4-expert MoE with `phoenix upcycle` (every expert a copy of
# the dense MLP, written at TP=PP=EP=1), then continue training from the upcycled weights
# with a fresh optimizer and the experts split over 2 processes (EP=2: the checkpoint
# reshards on load). The MoE's first loss is the dense model's, not ln(vocab).
# Usage: examples/moe_upcycle.sh [PYTHON] [RUN_DIR]   (defaults: .venv/bin/python, runs/moe_upcycle)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${1:-.venv/bin/python}
RUN=${2:-runs/moe_upcycle}
RECIPE=configs/recipes/moe_upcycle.yaml
export OMP_NUM_THREADS=1
TORCHRUN="$PY -m torch.distributed.run --standalone --nproc_per_node 2"

say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

examples/prepare_tiny_data.sh "$PY"

say "1/3 train the dense model (2 data-parallel processes, 30 steps)"
DENSE=(model.moe=null checkpoint.init_from=null output_dir=$RUN/dense
       train.steps=30 optim.lr=3.0e-3 optim.min_lr=3.0e-4 optim.warmup_steps=5
       checkpoint.save_interval=30)
$TORCHRUN -m phoenix.train $RECIPE "${DENSE[@]}"

say "2/3 upcycle: dense checkpoint -> 4 experts per layer (one process)"
rm -rf "$RUN/upcycled"
$PY -m phoenix.cli upcycle $RUN/dense $RECIPE $RUN/upcycled
cat $RUN/upcycled/upcycle.json

say "3/3 continue the MoE from the upcycled weights (fresh optimizer, EP=2 on 2 processes)"
MOE=(output_dir=$RUN/moe checkpoint.init_from=$RUN/upcycled parallel.expert=2)
$TORCHRUN -m phoenix.train $RECIPE "${MOE[@]}"
echo "TensorBoard: $(dirname $PY)/tensorboard --logdir $RUN"
