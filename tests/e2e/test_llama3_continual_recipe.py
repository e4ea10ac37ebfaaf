"""configs/recipes/llama3_continual_zh.yaml through examples/continual_pretrain_llama3.sh on
CPU at tiny scale: HF import, vocabulary expansion with a Chinese sentencepiece model,
preprocessing with the expanded tokenizer, training (embeddings only, then everything with
30% English replay and a decay), export to HF and ``phoenix tokenizer check``."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]


def test_llama3_continual_recipe_runs_end_to_end(tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    work = tmp_path / "llama3_zh"
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))
    proc = subprocess.run(["bash", "examples/continual_pretrain_llama3.sh", sys.executable, str(work)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]

    info = json.loads((work / "expanded" / "vocab_expansion.json").read_text())
    assert info["old_vocab_size"] == 392 and info["new_vocab_size"] > 500
    assert "optim.freeze: parameters frozen for optimizer steps 0..3 except " \
           "embedding.word_embeddings.weight, output_layer.weight" in log
    assert "initialised weights (the optimizer starts fresh) from" in log
    assert "stage 2/3 'main' begins at step 4" in log and "stage 3/3 'decay' begins at step 12" in log
    assert log.count("texts are encoded identically") == 2
    losses = [float(line.split("| loss ")[1].split()[0]) for line in log.splitlines() if "| loss " in line]
    assert len(losses) == 4 and losses[-1] < losses[0]

    hf = json.loads((work / "hf_out" / "config.json").read_text())
    assert hf["vocab_size"] == info["new_vocab_size"] and hf["architectures"] == ["LlamaForCausalLM"]
    assert hf["rope_parameters"]["rope_type"] == "llama3"
    model = AutoModelForCausalLM.from_pretrained(work / "hf_out")
    assert model.get_input_embeddings().weight.shape[0] == info["new_vocab_size"]
    with torch.no_grad():
        logits = model(torch.tensor([[384, 400, 500, 600]])).logits
    assert logits.shape[-1] == info["new_vocab_size"] and torch.isfinite(logits).all()
