#!/usr/bin/env bash
# Tiny synthetic datasets for the quickstart and the recipe examples (CPU, seconds):
# corpus -> sentencepiece tokenizer -> megatron-core .bin/.idx in runs/quickstart/data.
# Each step is skipped when its output exists. Usage: examples/prepare_tiny_data.sh [PYTHON]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${1:-.venv/bin/python}
DATA=runs/quickstart/data
mkdir -p "$DATA"

say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

say "synthetic corpus (web, code grouped by repository, a small math set, a new domain)"
[ -f $DATA/web.jsonl ] || $PY -m phoenix.cli make-corpus --output $DATA/web.jsonl --num-docs 3000 --seed 1 --domain web
[ -f $DATA/code.jsonl ] || $PY -m phoenix.cli make-corpus --output $DATA/code.jsonl --num-docs 1500 --seed 2 --domain code --group-key repo --docs-per-group 1 3
[ -f $DATA/math.jsonl ] || $PY -m phoenix.cli make-corpus --output $DATA/math.jsonl --num-docs 300 --seed 3 --domain math
[ -f $DATA/heldout_web.jsonl ] || $PY -m phoenix.cli make-corpus --output $DATA/heldout_web.jsonl --num-docs 200 --seed 99 --domain web
[ -f $DATA/newdomain.jsonl ] || $PY -m phoenix.cli make-corpus --output $DATA/newdomain.jsonl --num-docs 2000 --seed 5 --domain math

say "sentencepiece tokenizer"
[ -f $DATA/tokenizer.model ] || $PY -m phoenix.cli train-tokenizer --input $DATA/web.jsonl $DATA/code.jsonl $DATA/math.jsonl \
    --text-key text --model-prefix $DATA/tokenizer --vocab-size 1024

say "tokenise into megatron-core .bin/.idx"
[ -f $DATA/web.idx ] || $PY -m phoenix.cli preprocess --input $DATA/web.jsonl --output-prefix $DATA/web \
    --tokenizer-model $DATA/tokenizer.model --workers 2 --name web --tags web,en
[ -f $DATA/code.idx ] || $PY -m phoenix.cli preprocess --input $DATA/code.jsonl --output-prefix $DATA/code \
    --tokenizer-model $DATA/tokenizer.model --workers 2 --group-key repo --name code --tags code
[ -f $DATA/math.idx ] || $PY -m phoenix.cli preprocess --input $DATA/math.jsonl --output-prefix $DATA/math \
    --tokenizer-model $DATA/tokenizer.model --workers 2 --name math --tags math
[ -f $DATA/heldout_web.idx ] || $PY -m phoenix.cli preprocess --input $DATA/heldout_web.jsonl \
    --output-prefix $DATA/heldout_web --tokenizer-model $DATA/tokenizer.model --name heldout_web --tags eval
[ -f $DATA/newdomain.idx ] || $PY -m phoenix.cli preprocess --input $DATA/newdomain.jsonl \
    --output-prefix $DATA/newdomain --tokenizer-model $DATA/tokenizer.model --workers 2 --name new --tags new
