"""examples/forensics.sh end to end (configs/recipes/forensics.yaml, tiny, CPU): a run whose
step 16 is made to spike, the same run resumed from step 12 with step 16's batch skipped,
the run report of both, a checkpoint comparison and the per-document scores. Each
product is checked against an independent source: the runs' own event files (read with
TensorBoard's reader), the spike and skip records against each other, the scores against
the dataset's own index."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
SPIKE_STEP = 16


def _scalars(run: Path) -> dict[str, dict[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from phoenix.monitor.tensorboard import tensorboard_dir

    acc = EventAccumulator(str(tensorboard_dir(run, "forensics")),
                           size_guidance={"scalars": 0, "histograms": 0})
    acc.Reload()
    tags = acc.Tags()
    out = {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in tags["scalars"]}
    out["__histograms__"] = {tag: sorted({e.step for e in acc.Histograms(tag)})
                             for tag in tags["histograms"]}
    return out


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_forensics_example_finds_explains_and_skips_a_spike(tmp_path):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    run = tmp_path / "run"
    skip = tmp_path / "run-skip"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    proc = subprocess.run(["bash", "examples/forensics.sh", sys.executable, str(run)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=900)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]

    # The spike: found at step 16 only, with the batch it trained on.
    spikes = _records(run / "spikes.jsonl")
    assert [s["step"] for s in spikes] == [SPIKE_STEP], spikes
    assert "loss" in spikes[0]["spikes"]
    events = _scalars(run)
    loss = events["1_train/loss"]
    assert sorted(loss) == list(range(1, 21))
    assert spikes[0]["loss"] == pytest.approx(loss[SPIKE_STEP], rel=1e-6)
    assert loss[SPIKE_STEP] > 10 * loss[SPIKE_STEP - 1]

    # The skip: the copy read step 16's batch without training on it, and no spike.
    skipped = _records(skip / "skipped_batches.jsonl")
    assert [r["step"] for r in skipped] == [SPIKE_STEP]
    skipped_ids = {(s["dataset_id"], s["sample_id"]) for s in skipped[0]["samples"]}
    assert len(skipped_ids) == skipped[0]["global_batch_size"] == 16
    spiked_ids = {(s["dataset_id"], s["sample_id"]) for s in spikes[0]["top_samples"]}
    assert spiked_ids <= skipped_ids  # the samples blamed for the spike are the ones skipped
    assert _records(skip / "spikes.jsonl") == []
    skip_loss = _scalars(skip)["1_train/loss"]
    assert SPIKE_STEP not in skip_loss and sorted(skip_loss) == [s for s in range(1, 21)
                                                                 if s != SPIKE_STEP]
    for step in range(1, SPIKE_STEP):  # identical up to the skip
        assert skip_loss[step] == loss[step]
    assert max(skip_loss.values()) < 8
    for folder, was_skipped in ((skip, True), (run, False)):  # inspect-batch says which
        shown = subprocess.run([sys.executable, "-m", "phoenix.cli", "inspect-batch", str(folder),
                                str(SPIKE_STEP), "--json", "--chars", "0"], cwd=ROOT, env=env,
                               capture_output=True, text=True, timeout=300)
        rows = [json.loads(line) for line in shown.stdout.splitlines()]
        assert {(r["dataset_id"], r["sample_id"]) for r in rows} == skipped_ids, shown.stderr
        assert all(r["skipped"] is was_skipped for r in rows)

    # Optimizer-state norms every step, histograms every 6 steps and at the end.
    for family in ("adam_m_norm", "adam_v_norm", "adam_direction_norm"):
        assert sorted(events[f"{family}/global"]) == list(range(1, 21)), family
        assert events[f"{family}/layer_00/mlp/fc1"][SPIKE_STEP] > 0
    hists = events["__histograms__"]
    assert {"param_hist/embedding", "grad_hist/output_layer", "param_hist/layer_03/mlp/fc1"} \
        <= set(hists)
    assert hists["param_hist/embedding"] == [6, 12, 18, 20]  # and the last step

    # The report: both runs, the spike marked where the event files have it.
    report = json.loads((run / "report" / "report.json").read_text())
    assert [r["path"] for r in report["runs"]] == [str(run), str(skip)]
    loss_plot = next(p for p in report["plots"] if p["png"] == "loss.png")
    assert [(m["run"], m["step"]) for m in loss_plot["marks"]] == [(report["runs"][0]["label"],
                                                                    SPIKE_STEP)]
    curve = next(c for c in loss_plot["curves"] if c["run"] == report["runs"][0]["label"])
    assert dict(zip(curve["steps"], curve["values"])) == pytest.approx(loss, rel=1e-6)
    # the skipped batch: a grey band at step 16 of the copy, at the tokens of its step 15
    skip_label = report["runs"][1]["label"]
    assert [r["skipped"] for r in report["runs"]] == [[], [SPIKE_STEP]]
    skip_tokens = _scalars(skip)["1_train/consumed_tokens"]
    assert loss_plot["skipped"] == [{"run": skip_label, "step": SPIKE_STEP,
                                     "tokens": skip_tokens[SPIKE_STEP - 1]}]
    assert SPIKE_STEP not in next(c for c in loss_plot["curves"]
                                  if c["run"] == skip_label)["steps"]
    grad_map = next(p for p in report["plots"] if p["png"] == "run1_grad_norm.png")
    column = grad_map["steps"].index(SPIKE_STEP)  # an empty column, between steps 15 and 17
    assert grad_map["steps"][column - 1: column + 2] == [SPIKE_STEP - 1, SPIKE_STEP, SPIKE_STEP + 1]
    assert all(row[column] is None for row in grad_map["values"])
    html = (run / "report" / "index.html").read_text()
    assert f"inspect-batch {run} {SPIKE_STEP}" in html
    assert f"<td>{SPIKE_STEP}</td></tr>" in html  # the copy's skipped batches
    for plot in report["plots"]:
        assert (run / "report" / plot["png"]).stat().st_size > 1000

    # The comparison of step 12 and step 18, and the data scores.
    rows = list(csv.DictReader((run / "compare" / "compare.csv").open()))
    glob = [r for r in rows if r["state"] == "weight" and r["key"] == "global"]
    assert len(glob) == 1 and 0 < float(glob[0]["rel_delta"]) < 1
    assert {r["state"] for r in rows} == {"weight", "exp_avg", "exp_avg_sq"}
    assert (run / "compare" / "heatmap.png").is_file() and (run / "compare" / "hist.png").is_file()
    scores = np.load(run / "scores" / "math.npz")
    documents = len(IndexedDataset(str(ROOT / "runs/quickstart/data/math")).document_indices) - 1
    assert len(scores["loss"]) == documents
    assert np.all(np.isfinite(scores["loss"])) and np.all(scores["min_k"] <= 0)
