"""``phoenix report``: two tiny CPU runs (one with two stages and a forced loss spike)
reported on shared axes; every series of report.json against the run's event files read
independently with TensorBoard's own EventAccumulator, the stage boundary against the
run's ``1_train/stage`` scalars, the spike against spikes.jsonl; the PNG files decoded by
PIL; index.html against the files it must show; the CLI's one-line errors."""

import json
import math
import subprocess
import sys

import numpy as np
import pytest

from phoenix.monitor.report import build_report
from phoenix.monitor.tensorboard import tensorboard_dir

pytest.importorskip("matplotlib")
Image = pytest.importorskip("PIL.Image")

SPIKE_AT = 5
SPIKES = dict(enabled=True, window=5, min_steps=4, loss_sigma=3.0, grad_norm_sigma=None,
              rel_std_floor=0.5, top_samples=3, top_layers=3)


def _staged(tiny_data, out):
    from phoenix.testing.tiny import tiny_config_dict

    d = tiny_config_dict(tiny_data, out, logging={"tensorboard": True, "norm_interval": 1})
    d["train"].pop("steps")
    d["optim"] = {"schedule": {"peak_lr": 3e-3, "min_lr": 3e-4}}
    d["stages"] = [
        {"name": "s1", "steps": 3, "mixture": {"web": 0.7, "code": 0.3},
         "lr": [{"kind": "warmup", "steps": 2}, {"kind": "constant", "steps": 1}]},
        {"name": "s2", "steps": 3, "mixture": {"web": 0.3, "code": 0.7},
         "lr": [{"kind": "decay", "steps": 3, "target_lr": 3e-4, "shape": "cosine"}]}]
    return d


@pytest.fixture(scope="module")
def report(tiny_data, tmp_path_factory):
    """Run ``a``: 6 steps in stages s1 | s2, the loss of step 5 x20; run ``b``: 5 steps of
    a smaller batch (so tokens and steps differ), norms every 2nd step. One process."""
    from phoenix.testing.distributed import run_distributed
    from phoenix.testing.tiny import tiny_config_dict
    from phoenix.testing.workers import train_runs_with_spikes

    root = tmp_path_factory.mktemp("report")
    a, b = root / "a", root / "b"
    cfg_b = tiny_config_dict(tiny_data, b, train={"steps": 5, "global_batch_size": 4},
                             logging={"tensorboard": True, "norm_interval": 2})
    run_distributed(train_runs_with_spikes, 1, [(_staged(tiny_data, a), SPIKES, [], SPIKE_AT, 20.0),
                                                (cfg_b, SPIKES, [], None)])
    out = root / "out"
    data = build_report([a, b], out)
    return {"a": a, "b": b, "out": out, "data": data}


def _events(run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tensorboard_dir(run, "tiny")), size_guidance={"scalars": 0})
    acc.Reload()
    return acc


def _plot(data, png):
    (plot,) = [p for p in data["plots"] if p["png"] == png]
    return plot


def _same(report_values, events):
    want = [None if not math.isfinite(e.value) else e.value for e in events]
    assert report_values == want


@pytest.mark.slow
def test_every_series_is_the_event_files(report):
    data = report["data"]
    assert json.loads((report["out"] / "report.json").read_text()) == data
    for run, label in ((report["a"], "tiny (a)"), (report["b"], "tiny (b)")):
        acc = _events(run)
        tokens = {e.step: e.value for e in acc.Scalars("1_train/consumed_tokens")}
        for png, tag in (("loss.png", "1_train/loss"), ("lr.png", "1_train/lr"),
                         ("grad_norm.png", "1_train/grad_norm"),
                         ("dataset_loss.png", "2_datasets/loss/web"),
                         ("dataset_loss.png", "2_datasets/loss/code")):
            (curve,) = [c for c in _plot(data, png)["curves"]
                        if c["run"] == label and c["tag"] == tag]
            events = acc.Scalars(tag)
            assert curve["steps"] == [e.step for e in events]
            _same(curve["values"], events)
            assert curve["tokens"] == [tokens[e.step] for e in events]
        i = [r["label"] for r in data["runs"]].index(label)
        layers = sorted(t for t in acc.Tags()["scalars"]
                        if t.startswith("grad_norm/layer_") and t.count("/") == 1)
        for family in ("grad_norm", "param_norm", "update_norm", "update_ratio"):
            heat = _plot(data, f"run{i}_{family}.png")
            assert heat["scale"] == "log10" and heat["layers"] == list(range(len(layers)))
            for row, layer in zip(heat["values"], heat["layers"]):
                events = acc.Scalars(f"{family}/layer_{layer:02d}")
                assert heat["steps"] == [e.step for e in events]
                _same(row, events)
    # One colour range per family over both runs: the range of every run's log10 values.
    for family in ("grad_norm", "param_norm", "update_norm", "update_ratio"):
        heats = [_plot(data, f"run{i}_{family}.png") for i in range(len(data["runs"]))]
        cells = [v for h in heats for row in h["values"] for v in row if v is not None and v > 0]
        want = [math.log10(min(cells)), math.log10(max(cells))]
        assert all(h["range"] == pytest.approx(want) for h in heats), family
    # b logged norms every 2nd step (and at its last): the heatmap's columns are those
    assert _plot(data, "run1_grad_norm.png")["steps"] == [2, 4, 5]


@pytest.mark.slow
def test_stages_and_spike_are_marked(report):
    data = report["data"]
    run_a, run_b = data["runs"]
    # the stage table of a's config.yaml, against where a's 1_train/stage scalar changes
    stage = {e.step: e.value for e in _events(report["a"]).Scalars("1_train/stage")}
    first_s2 = min(s for s, v in stage.items() if v == 1)
    assert run_a["stage_source"] == "config.yaml" and run_b["stages"] == []
    assert [(s["name"], s["first_step"]) for s in run_a["stages"]] == [("s1", 1), ("s2", first_s2)]
    for png in ("loss.png", "lr.png", "dataset_loss.png"):
        assert [(s["name"], s["step"]) for s in _plot(data, png)["stages"]] == \
            [("tiny (a): s2", first_s2 - 0.5)]

    records = [json.loads(line) for line in (report["a"] / "spikes.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [SPIKE_AT] and run_b["spikes"] == []
    assert run_a["spikes"] == records
    (mark,) = _plot(data, "loss.png")["marks"]
    assert (mark["run"], mark["step"], mark["value"]) == ("tiny (a)", SPIKE_AT, records[0]["loss"])
    loss = {e.step: e.value for e in _events(report["a"]).Scalars("1_train/loss")}
    assert mark["value"] == pytest.approx(loss[SPIKE_AT], rel=1e-6)
    assert loss[SPIKE_AT] > 10 * loss[SPIKE_AT - 1]
    # the spike table lists the spiking batch's top samples with their provenance
    page = (report["out"] / "index.html").read_text()
    row = page.split(f'id="spike-0-{SPIKE_AT}"')[1].split("</tr>")[0]
    assert f"phoenix inspect-batch {report['a']} {SPIKE_AT}" in row
    for s in records[0]["top_samples"]:
        assert f"<code>{s['dataset']}</code> / {s['sample_id']} / {s['document_id']}" in row


@pytest.mark.slow
def test_pngs_are_drawn_and_on_the_page(report):
    out, data = report["out"], report["data"]
    pngs = {p["png"] for p in data["plots"]}
    assert {"loss.png", "dataset_loss.png", "lr.png", "grad_norm.png"} <= pngs
    assert sorted(p.name for p in out.glob("*.png")) == sorted(pngs)
    page = (out / "index.html").read_text()
    for png in pngs:
        assert f'src="{png}"' in page
        image = np.asarray(Image.open(out / png).convert("RGB"))
        assert image.shape[0] > 150 and image.shape[1] > 400
        colours = image.reshape(-1, 3).astype(np.int64) @ np.array([1 << 16, 1 << 8, 1])
        assert len(np.unique(colours)) > 50, png  # not a blank canvas
    # two runs share one loss figure: both curves, on one step and one token axis
    assert [c["run"] for c in _plot(data, "loss.png")["curves"]] == ["tiny (a)", "tiny (b)"]


SHARES = ([0.1, 0.2, 0.3, 0.4], [0.25, 0.25, 0.5, 0.0])


def test_other_layer_families_and_stages_from_the_events(tmp_path):
    """A family the report does not know by name (optimizer-state norms), MoE tags, and a
    run whose config.yaml is gone: stages where ``1_train/stage`` changes."""
    from torch.utils.tensorboard import SummaryWriter

    run = tmp_path / "run"
    writer = SummaryWriter(str(tensorboard_dir(run, "moe")))
    for step in range(1, 5):
        writer.add_scalar("1_train/loss", 5.0 - step / 10, step)
        writer.add_scalar("1_train/stage", float(step >= 3), step)
        writer.add_scalar("moe/aux_loss", 1.0 + step / 100, step)
        for layer in range(3):
            writer.add_scalar(f"adam_exp_avg_sq_norm/layer_{layer:02d}", 10.0 ** (layer - step), step)
            writer.add_scalar(f"adam/exp_avg/layer_{layer:02d}", 1.0 + layer, step)
            writer.add_scalar(f"adam/exp_avg/layer_{layer:02d}/mlp/fc1", 1.0, step)  # a part
            # layer 0 frozen: its update is 0, which a log scale must still draw
            writer.add_scalar(f"update_norm/layer_{layer:02d}", layer * 1e-3 * step, step)
            writer.add_scalar(f"moe/layer_{layer:02d}/imbalance", 1.0 + layer + step, step)
            for expert, share in enumerate(SHARES[(layer + step) % 2]):
                writer.add_scalar(f"moe/layer_{layer:02d}/expert_{expert:02d}/tokens", share, step)
    writer.close()
    data = build_report([run], tmp_path / "out")
    heat = _plot(data, "run0_adam_exp_avg_sq_norm.png")
    assert heat["scale"] == "log10" and heat["steps"] == [1, 2, 3, 4]
    assert heat["values"] == [[pytest.approx(10.0 ** (layer - s)) for s in range(1, 5)]
                              for layer in range(3)]
    nested = _plot(data, "run0_adam_exp_avg.png")
    assert nested["family"] == "adam/exp_avg" and nested["layers"] == [0, 1, 2]
    frozen = _plot(data, "run0_update_norm.png")
    assert frozen["scale"] == "log10" and frozen["values"][0] == [0.0] * 4
    moe = _plot(data, "run0_moe_imbalance.png")
    assert moe["scale"] == "linear" and moe["values"][2] == [4.0, 5.0, 6.0, 7.0]
    assert _plot(data, "moe_aux_loss.png")["curves"][0]["tag"] == "moe/aux_loss"
    load = _plot(data, "run0_moe_expert_load.png")  # the last step's shares x E
    assert load["step"] == 4 and load["experts"] == [0, 1, 2, 3]
    assert load["values"] == [[pytest.approx(4 * x) for x in SHARES[(layer + 4) % 2]]
                              for layer in range(3)]
    assert data["runs"][0]["stage_source"] == "1_train/stage"
    assert [s["first_step"] for s in data["runs"][0]["stages"]] == [1, 3]
    page = (tmp_path / "out" / "index.html").read_text()
    assert all(f'src="{p["png"]}"' in page for p in data["plots"])


def test_bad_input_is_one_line_before_any_work(tmp_path, capsys):
    from phoenix.cli.report import main

    empty = tmp_path / "empty"
    empty.mkdir()
    a_file = tmp_path / "file"
    a_file.write_text("x")
    for argv, says in (([str(empty), "--out", str(tmp_path / "o1")], "no TensorBoard event files"),
                       ([str(empty / "nope"), "--out", str(tmp_path / "o2")], "no such run folder")):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert says in err and err.count("\n") == 1, err
        assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()
    # a run with event files, an --out that cannot be a folder
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(tensorboard_dir(tmp_path / "run", "x")))
    writer.add_scalar("1_train/loss", 1.0, 1)
    writer.close()
    assert main([str(tmp_path / "run"), "--out", str(a_file / "sub")]) == 2
    err = capsys.readouterr().err
    assert "--out" in err and err.count("\n") == 1, err
    # the installed command: one line on stderr, exit status 2, no traceback
    done = subprocess.run([sys.executable, "-m", "phoenix.cli", "report", str(empty / "nope"),
                           "--out", str(tmp_path / "o3")], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    assert done.stderr.startswith("phoenix report: error:") and not (tmp_path / "o3").exists()


def test_runs_of_one_name_are_told_apart_by_their_folders(tmp_path):
    """Runs of the same recipe name get their folder in the label; a folder named as the
    recipe gets its whole path (``tiny (tiny)`` would tell nothing)."""
    from torch.utils.tensorboard import SummaryWriter

    from phoenix.monitor.report_data import load_runs

    runs = [tmp_path / "x" / "tiny", tmp_path / "y" / "tiny", tmp_path / "other", tmp_path / "solo"]
    for run, name in zip(runs, ["tiny", "tiny", "tiny", "solo"]):
        with SummaryWriter(str(run / "tensorboard" / name)) as writer:
            writer.add_scalar("1_train/loss", 1.0, 1)
    assert [r.label for r in load_runs(runs)] == [f"tiny ({runs[0]})", f"tiny ({runs[1]})",
                                                  "tiny (other)", "solo"]
