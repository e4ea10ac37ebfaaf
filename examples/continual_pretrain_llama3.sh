#!/usr/bin/env bash
# The Llama-3 continual-pretraining recipe (configs/recipes/llama3_continual_zh.yaml) end to
# end on CPU at tiny scale: a random tiny Llama-3-shaped HF model and byte-level BPE
# tokenizer stand in for Meta-Llama-3-8B. Import -> expand the vocabulary with a Chinese
# sentencepiece model -> preprocess with the expanded tokenizer -> train (embeddings only,
# then everything with 30% English replay, then decay) -> export to HF -> check that the
# exported tokenizer encodes like the training one. The overrides below are the only
# difference from the real recipe: sizes, lengths, batch sizes, steps, device.
# Usage: examples/continual_pretrain_llama3.sh [PYTHON] [WORK_DIR]
#        (defaults: .venv/bin/python, runs/llama3_zh)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${1:-.venv/bin/python}
W=${2:-runs/llama3_zh}
RECIPE=configs/recipes/llama3_continual_zh.yaml
export OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1
P="$PY -m phoenix.cli"
rm -rf "$W" && mkdir -p "$W/data"

# Data: English (the replay) and Chinese-like text; a Chinese sentencepiece model.
$P make-corpus --output "$W/data/en.jsonl" --num-docs 300 --seed 1 --domain web --max-words 120
$P make-corpus --output "$W/data/zh.jsonl" --num-docs 300 --seed 2 --domain zh --max-words 120
$P make-corpus --output "$W/data/zh_sample.jsonl" --num-docs 20 --seed 3 --domain zh
$P train-tokenizer --input "$W/data/zh.jsonl" --text-key text --model-prefix "$W/data/zh_sp" \
    --vocab-size 400
# (1) "Meta-Llama-3-8B": tokenizer trained on English only, random weights; imported.
$PY -m phoenix.testing.hf_tiny "$W/hf_base" --corpus "$W/data/en.jsonl" --vocab-size 384
$P convert hf-to-phoenix "$W/hf_base" "$W/imported" --no-progress
# (2) The vocabulary grows with the Chinese pieces; the checkpoint is resized to it.
$P expand-vocab "$W/imported/tokenizer" --sp-model "$W/data/zh_sp.model" \
    --checkpoint "$W/imported" --out "$W/expanded"
TOK="$W/expanded/tokenizer/tokenizer.json"
$P preprocess --input "$W/data/zh.jsonl" --output-prefix "$W/data/zh" --tokenizer-model "$TOK" --no-progress
$P preprocess --input "$W/data/en.jsonl" --output-prefix "$W/data/en_replay" --tokenizer-model "$TOK" --no-progress
# (3)-(4) embeddings only, then everything on 70% zh + 30% en with a mixture warmup, then decay.
TINY=(
  output_dir=$W/cpt runtime.device=cpu
  model.preset=$W/expanded/model.yaml tokenizer.hf_dir=$W/expanded/tokenizer
  checkpoint.init_from=$W/expanded checkpoint.save_interval=0
  "data.datasets[0].prefix=$W/data/zh" "data.datasets[1].prefix=$W/data/en_replay"
  data.seq_length=64 data.prefetch_batches=0 parallel.tensor=1 parallel.sequence_parallel=false
  train.global_batch_size=8 train.micro_batch_size=4 train.precision=fp32
  optim.schedule.peak_lr=3.0e-3 optim.schedule.min_lr=3.0e-4 optim.freeze.steps=4
  "stages[0].steps=4" "stages[0].lr[0].steps=4" "stages[1].steps=8" "stages[1].lr[0].steps=8"
  "stages[1].mixture_warmup_steps=4" "stages[2].steps=4" "stages[2].lr[0].steps=4"
  "stages[2].lr[0].target_lr=3.0e-4" logging.log_interval=4
)
$PY -m phoenix.train $RECIPE "${TINY[@]}"
# (5) Export to HF; the exported tokenizer (AutoTokenizer) must encode like the training one.
$P convert phoenix-to-hf "$W/cpt" "$W/hf_out" --no-progress
$P tokenizer check "$TOK" "$W/hf_out" --corpus "$W/data/zh_sample.jsonl"
$P tokenizer check "$TOK" "$W/hf_out" --corpus "$W/data/en.jsonl"
echo "exported: $W/hf_out"
