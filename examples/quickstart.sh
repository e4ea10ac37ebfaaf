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

say "1/6 synthetic corpus (web, code grouped by repository, a small math set)"
[ -f $DATA/web.jsonl ] || $PY tools/make_corpus.py --output $DATA/web.jsonl --num-docs 3000 --seed 1 --domain web
[ -f $DATA/code.jsonl ] || $PY tools/make_corpus.py --output $DATA/code.jsonl --num-docs 1500 --seed 2 --domain code --group-key repo --docs-per-group 1 3
[ -f $DATA/math.jsonl ] || $PY tools/make_corpus.py --output $DATA/math.jsonl --num-docs 300 --seed 3 --domain math
[ -f $DATA/heldout_web.jsonl ] || $PY tools/make_corpus.py --output $DATA/heldout_web.jsonl --num-docs 200 --seed 99 --domain web

say "2/6 sentencepiece tokenizer"
[ -f $DATA/tokenizer.model ] || $PY tools/train_tokenizer.py --input $DATA/web.jsonl $DATA/code.jsonl $DATA/math.jsonl \
    --text-key text --model-prefix $DATA/tokenizer --vocab-size 1024

say "3/6 tokenise into megatron-core .bin/.idx"
[ -f $DATA/web.idx ] || $PY tools/preprocess_data.py --input $DATA/web.jsonl --output-prefix $DATA/web \
    --tokenizer-model $DATA/tokenizer.model --workers 2 --name web --tags web,en
[ -f $DATA/code.idx ] || $PY tools/preprocess_data.py --input $DATA/code.jsonl --output-prefix $DATA/code \
    --tokenizer-model $DATA/tokenizer.model --workers 2 --group-key repo --name code --tags code
[ -f $DATA/math.idx ] || $PY tools/preprocess_data.py --input $DATA/math.jsonl --output-prefix $DATA/math \
    --tokenizer-model $DATA/tokenizer.model --workers 2 --name math --tags math
[ -f $DATA/heldout_web.idx ] || $PY tools/preprocess_data.py --input $DATA/heldout_web.jsonl \
    --output-prefix $DATA/heldout_web --tokenizer-model $DATA/tokenizer.model --name heldout_web --tags eval

say "4/6 build the data plan upstream (exact per-batch mixture, whole repositories, math bursts)"
$PY tools/build_data_plan.py configs/quickstart.yaml

TORCHRUN="$PY -m torch.distributed.run --standalone --nproc_per_node 2"
say "5/6 pretrain 30 of 40 steps (torchrun, 2 processes, PP=2), checkpoint every 10"
$TORCHRUN -m phoenix.train configs/quickstart.yaml train.stop_at_step=30

say "6/6 resume from the latest checkpoint and finish the run"
$TORCHRUN -m phoenix.train configs/quickstart.yaml

latest=$(cat $RUN/checkpoints/latest)
cat <<MSG

Done.
  checkpoints : $RUN/checkpoints/ (latest: $latest)
  TensorBoard : $RUN/tensorboard/
  config      : $RUN/config.yaml
  spikes      : $RUN/spikes.jsonl (if any step spiked)
Open TensorBoard with:
  $(dirname $PY)/tensorboard --logdir $RUN/tensorboard
MSG
