"""The quickstart pipeline end to end, through `phoenix <cmd>` and torchrun:
corpus -> tokenizer -> preprocess -> data plan -> 2-process training -> resume; then the
TensorBoard event files are read back with TensorBoard's own reader."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from phoenix.monitor.tensorboard import tensorboard_dir

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
PHOENIX = ("-m", "phoenix.cli")  # `phoenix <cmd>` without relying on the console script


def _run(*args, cwd):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{args}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout + proc.stderr


def test_quickstart_pipeline(tmp_path):
    data = tmp_path / "data"
    _run(*PHOENIX, "make-corpus", "--output", data / "web.jsonl", "--num-docs", 400,
         "--seed", 1, cwd=tmp_path)
    _run(*PHOENIX, "make-corpus", "--output", data / "code.jsonl.gz", "--num-docs", 200,
         "--seed", 2, "--domain", "code", "--group-key", "repo", "--docs-per-group", 1, 2,
         "--max-words", 60, cwd=tmp_path)
    _run(*PHOENIX, "make-corpus", "--output", data / "math.jsonl", "--num-docs", 100,
         "--seed", 3, "--domain", "math", cwd=tmp_path)
    _run(*PHOENIX, "make-corpus", "--output", data / "heldout_web.jsonl", "--num-docs", 60,
         "--seed", 99, cwd=tmp_path)
    _run(*PHOENIX, "train-tokenizer", "--input", data / "web.jsonl", data / "code.jsonl.gz",
         "--text-key", "text", "--model-prefix", data / "tok", "--vocab-size", 512, cwd=tmp_path)
    for name, src, extra in (("web", "web.jsonl", []), ("code", "code.jsonl.gz", ["--group-key", "repo"]),
                             ("math", "math.jsonl", []), ("heldout_web", "heldout_web.jsonl", [])):
        _run(*PHOENIX, "preprocess", "--input", data / src, "--output-prefix", data / name,
             "--tokenizer-model", data / "tok.model", "--workers", 2, "--no-progress", *extra,
             cwd=tmp_path)
        assert (data / f"{name}.bin").is_file() and (data / f"{name}.idx").is_file()
    assert (data / "code.groups.npy").is_file()

    recipe = yaml.safe_load((ROOT / "configs/quickstart.yaml").read_text())
    recipe["output_dir"] = str(tmp_path / "run")
    recipe["tokenizer"]["model"] = str(data / "tok.model")
    for entry in recipe["data"]["datasets"]:
        entry["prefix"] = str(data / entry["name"])
    recipe["eval"]["sets"][0]["prefix"] = str(data / "heldout_web")
    recipe["eval"].update(interval=4, max_samples=16)
    recipe["data"]["seq_length"] = 64
    recipe["train"].update(steps=8, global_batch_size=8)
    recipe["checkpoint"].update(save_interval=3)
    recipe["logging"]["log_interval"] = 1
    cfg = tmp_path / "quickstart.yaml"
    cfg.write_text(yaml.safe_dump(recipe))

    plan = _run(*PHOENIX, "build-plan", cfg, cwd=tmp_path)
    for name in ("web", "code", "math"):
        assert name in plan
    assert len(list((tmp_path / "run" / "data_cache").glob("plan-*"))) == 1

    torchrun = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", 2,
                "-m", "phoenix.train", cfg]
    first = _run(*torchrun, "train.stop_at_step=5", cwd=tmp_path)
    assert "data plan: loaded" in first  # built upstream, not again by the trainer
    assert "step      5/8" in first and "step      6/8" not in first
    # The resume skips step 7's batch (train.skip_batches, on both pipeline stages).
    second = _run(*torchrun, "train.skip_batches=[[7,7]]", cwd=tmp_path)
    assert "resumed from" in second and "step_000005" in second
    assert "step      8/8" in second and "step      5/8" not in second
    assert "skipping steps 7..7" in second and "step      7/8" not in second

    run = tmp_path / "run"
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_000008"
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["parallel"]["pipeline"] == 2 and saved["train"]["steps"] == 8

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tensorboard_dir(run, "quickstart")))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    for tag in ("1_train/loss", "1_train/lr", "1_train/grad_norm", "1_train/consumed_tokens",
                "3_throughput/tokens_per_sec", "3_throughput/step_time"):
        assert tag in tags, (tag, tags)
    steps = sorted({e.step for e in acc.Scalars("1_train/loss")})
    assert steps == [1, 2, 3, 4, 5, 6, 8]  # both jobs wrote to the same log; 7 was skipped
    losses = {e.step: e.value for e in acc.Scalars("1_train/loss")}
    assert losses[8] < losses[1]
    consumed = {e.step: e.value for e in acc.Scalars("1_train/consumed_tokens")}
    # Loss-bearing tokens of the 8 planned batches, counted from the plan file and the
    # sample lengths (grouped code samples end short at group boundaries).
    import numpy as np

    from phoenix.data.samples import build_sample_index

    (plan_dir,) = (run / "data_cache").glob("plan-*")
    ds_ids = np.load(plan_dir / "dataset_ids.npy")[: 8 * 8]
    sample_ids = np.load(plan_dir / "sample_ids.npy")[: 8 * 8]
    lengths = [build_sample_index(str(data / n), 64, use_groups=n == "code").lengths
               for n in ("web", "code", "math")]
    trained = [i for i in range(8 * 8) if i // 8 != 6]  # step 7's batch was skipped
    expected = sum(int(lengths[ds_ids[i]][sample_ids[i]]) - 1 for i in trained)
    assert consumed[8] == expected and expected <= 7 * 8 * 64
    from phoenix.io import read_jsonl

    (skipped,) = read_jsonl(run / "skipped_batches.jsonl")  # written once, by one rank
    assert skipped["step"] == 7
    assert sorted((r["dataset_id"], r["sample_id"]) for r in skipped["samples"]) == \
        sorted(zip(ds_ids[48:56].tolist(), sample_ids[48:56].tolist()))
    assert "config" in " ".join(acc.Tags().get("tensors", []))
    for layer in range(4):  # per-layer norms, layers numbered globally across the 2 stages
        assert f"grad_norm/layer_{layer:02d}" in tags
    assert {"grad_norm/global", "param_norm/embedding", "update_ratio/output_layer"} <= tags
    # every tag family of the quickstart: per-dataset loss/tokens, throughput, eval, spikes
    assert {"2_datasets/loss/web", "2_datasets/tokens/code", "3_throughput/tflops_per_gpu",
            "3_throughput/forward_backward_time", "spikes/count"} <= tags, tags
    for metric in ("loss", "ppl", "top1", "top5"):
        steps = [e.step for e in acc.Scalars(f"eval/heldout_web/{metric}")]
        assert steps == [4, 5, 8], (metric, steps)  # every 4 steps and at the end of each job
