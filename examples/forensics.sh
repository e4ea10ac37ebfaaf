#!/usr/bin/env bash
# A loss spike, found and skipped (configs/recipes/forensics.yaml, tiny, CPU, one process):
#   1. train 12 of 20 steps; copy the run at step 12 (a second run to compare with)
#   2. finish the run with a fault injected at step 16 (its loss x30, as a bad batch
#      would do): spikes.jsonl records the step and the samples it trained on
#   3. finish the copy from step 12 with the same fault and train.skip_batches=[[16,16]]:
#      step 16's batch is read but not trained on, and no spike happens
#   4. phoenix report: both runs on shared axes, the spike marked, per-layer heatmaps
#   5. phoenix compare-checkpoints: what moved between step 12 and step 18
#   6. phoenix score-data: per-document loss of the math set under the final model
# Usage: examples/forensics.sh [PYTHON] [RUN_DIR]   (defaults: .venv/bin/python, runs/forensics)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${1:-.venv/bin/python}
RUN=${2:-runs/forensics}
RECIPE=configs/recipes/forensics.yaml
export OMP_NUM_THREADS=1
FAULT='logging.callbacks={inject_spike: {class: "phoenix.testing.faults:ScaleLossAt", step: 16, factor: 30}}'

say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

examples/prepare_tiny_data.sh "$PY"
rm -rf "$RUN" "$RUN-skip"

say "1/6 train 12 of 20 steps (checkpoints at 6 and 12)"
$PY -m phoenix.train $RECIPE output_dir=$RUN train.stop_at_step=12
cp -r "$RUN" "$RUN-skip"

say "2/6 finish the run; the fault makes step 16 spike"
$PY -m phoenix.train $RECIPE output_dir=$RUN "$FAULT"
cat $RUN/spikes.jsonl

say "3/6 finish the copy from step 12, skipping step 16's batch"
$PY -m phoenix.train $RECIPE output_dir=$RUN-skip "$FAULT" 'train.skip_batches=[[16, 16]]'
cat $RUN-skip/skipped_batches.jsonl

say "4/6 the run report (both runs on shared axes)"
$PY -m phoenix.cli report $RUN $RUN-skip --out $RUN/report

say "5/6 what moved between step 12 and step 18"
$PY -m phoenix.cli compare-checkpoints $RUN/checkpoints/step_000012 $RUN/checkpoints/step_000018 \
    --out $RUN/compare --hist embedding layer_00/mlp/fc1

say "6/6 per-document loss of the math set under the final model"
$PY -m phoenix.cli score-data $RUN runs/quickstart/data/math --out $RUN/scores/math

echo
echo "Report: $RUN/report/index.html   TensorBoard: $(dirname $PY)/tensorboard --logdir $RUN/tensorboard"
