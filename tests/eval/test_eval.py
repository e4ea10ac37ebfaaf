"""Held-out evaluation: metrics against a direct computation, layout independence,
TensorBoard logging, passivity (training numbers unchanged), and ``phoenix eval``."""

import dataclasses
import json
import math

import pytest

from phoenix.config import ConfigError
from phoenix.config.eval import EvalConfig
from phoenix.config.typed import from_dict
from phoenix.eval.evaluator import EvalResult, format_table, select_samples
from phoenix.monitor.tensorboard import tensorboard_dir
from phoenix.testing.distributed import run_distributed
from phoenix.testing.tiny import tiny_config_dict
from phoenix.testing.workers import run_eval_cli, train_with_eval

STEPS, INTERVAL = 4, 2
KEYS = ("loss", "ppl", "top1", "top5")


def _eval_section(tiny_data) -> dict:
    # 10 samples in micro-batches of 4: the last micro-batch is padded (no-loss copies).
    return {"sets": [{"name": "code", "prefix": tiny_data.prefixes["code"]},
                     {"name": "web", "prefix": tiny_data.prefixes["web"]}],
            "interval": INTERVAL, "max_samples": 10, "micro_batch_size": 4}


def _config(tiny_data, out) -> dict:
    # Train on web only: code is held out. make_vocab_size_divisible_by=96 pads the
    # 512-token vocab to 576 rows, so padding masking is exercised (TP=2: 288 per rank).
    return tiny_config_dict(
        tiny_data, out, model={"preset": "tiny", "make_vocab_size_divisible_by": 96},
        data={"datasets": [{"prefix": tiny_data.prefixes["web"], "name": "web"}]},
        train={"steps": STEPS},
        checkpoint={"save_at_end": True},
        logging={"tensorboard": True, "norm_interval": 0})


def _cli_args(run_dir, tiny_data, out_file) -> list[str]:
    return [str(run_dir), str(run_dir / "config.yaml"),
            "--set", f"code={tiny_data.prefixes['code']}", "--set", f"web={tiny_data.prefixes['web']}",
            "--max-samples", "10", "--micro-batch-size", "4", "--out", str(out_file)]


def _close(a, b, rel):
    return math.isclose(a, b, rel_tol=rel, abs_tol=0.0)


# -- fast, single-process ------------------------------------------------------------
def test_eval_config_validation():
    cfg = from_dict(EvalConfig, {"sets": [{"prefix": "/d/code_val"}], "interval": 5}, "eval")
    assert cfg.sets[0].display_name == "code_val" and cfg.at_end and cfg.max_samples == 256
    bad = {
        "eval.sets: at least one": {"sets": []},
        "eval.sets: at least one eval set is required": {},
        "eval.sets[1].name: 'a' is used twice": {"sets": [{"prefix": "x/a"}, {"prefix": "y/a"}]},
        "eval.interval: must be >= 0": {"sets": [{"prefix": "a"}], "interval": -1},
        "eval.max_samples": {"sets": [{"prefix": "a"}], "max_samples": -2},
        "eval.micro_batch_size": {"sets": [{"prefix": "a"}], "micro_batch_size": 0},
        "unknown config key 'eval.sets[0].prefx'": {"sets": [{"prefx": "a"}]},
        "eval.sets[0].name": {"sets": [{"prefix": "a", "name": "x/y"}]},
    }
    for message, data in bad.items():
        with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
            from_dict(EvalConfig, data, "eval")


def test_select_samples_and_table():
    assert select_samples(10, 0).tolist() == list(range(10))
    assert select_samples(10, 20).tolist() == list(range(10))
    ids = select_samples(1000, 7)
    assert len(set(ids.tolist())) == 7 and ids[0] == 0 and ids[-1] > 800  # spread over the set
    r = EvalResult("code", "/p", 10, 630, 2.0, math.exp(2.0), 0.25, 0.5)
    table = format_table({"code": r})
    assert "code" in table and "7.389" in table and "0.2500" in table


def test_run_config_eval_section(tiny_data, tmp_path):
    """Once RunConfig has the ``eval`` field and the Trainer registers the callback."""
    from phoenix.config import RunConfig, build_config

    assert "eval" in {f.name for f in dataclasses.fields(RunConfig)}
    from phoenix.eval.callback import EvalCallback
    from phoenix.train.trainer import Trainer

    section = _eval_section(tiny_data)
    cfg = build_config(tiny_config_dict(tiny_data, tmp_path, eval=section))
    assert isinstance(cfg.eval, EvalConfig) and cfg.eval.interval == INTERVAL
    with pytest.raises(ConfigError, match=r"eval\.sets\[0\]\.prefix"):
        build_config(tiny_config_dict(tiny_data, tmp_path, eval={"sets": [{"name": "x"}]}))
    assert build_config(tiny_config_dict(tiny_data, tmp_path)).eval is None
    trainer = Trainer(cfg, layout=None)
    assert sum(isinstance(cb, EvalCallback) for cb in trainer.callbacks) == 1


# -- multi-process / end to end -------------------------------------------------------
@pytest.fixture(scope="module")
def trained(tiny_data, tmp_path_factory):
    """One single-process job: training with eval every 2 steps and at the end (final
    checkpoint saved); then, in the same process, the direct reference computation on
    the trained model and ``phoenix eval`` on the saved checkpoint (written to a JSON)."""
    out = tmp_path_factory.mktemp("eval_run")
    cli_out = out / "standalone" / "eval.json"
    (result,) = run_distributed(train_with_eval, 1, _config(tiny_data, out), [],
                                _eval_section(tiny_data), True, _cli_args(out, tiny_data, cli_out))
    result["cli_json"] = json.loads(cli_out.read_text()) if cli_out.exists() else None
    return out, result


@pytest.mark.slow
def test_eval_logged_and_training_unchanged(trained, tiny_data, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir, result = trained
    assert [step for step, _ in result["evals"]] == [2, 4]
    for _, sets in result["evals"]:
        for r in sets.values():
            assert r["samples"] == 10 and r["tokens"] == 10 * 64  # padding carried no loss
            assert _close(r["ppl"], math.exp(r["loss"]), 1e-12)
            assert 0 < r["top1"] < r["top5"] < 1
    # Training moved the held-out numbers (so the periodic evaluations are really re-run).
    assert result["evals"][0][1]["code"]["loss"] != result["evals"][1][1]["code"]["loss"]

    acc = EventAccumulator(str(tensorboard_dir(run_dir, "tiny")), size_guidance={"scalars": 0})
    acc.Reload()
    for name in ("code", "web"):
        for key in KEYS:
            events = acc.Scalars(f"eval/{name}/{key}")
            assert [e.step for e in events] == [2, 4], (name, key)
            for e, (_, sets) in zip(events, result["evals"]):
                assert _close(e.value, sets[name][key], 1e-6), (name, key, e.value)

    # The same run without evaluation trains bit for bit the same.
    (plain,) = run_distributed(train_with_eval, 1, _config(tiny_data, tmp_path / "plain"), [], None)
    assert plain["evals"] == []
    assert plain["losses"] == result["losses"]
    assert len(plain["losses"]) == STEPS


@pytest.mark.slow
def test_metrics_match_direct_computation(trained):
    """The evaluator (at the end of training) against plain torch on the full logits of
    the same model and samples."""
    _, result = trained
    step, at_end = result["evals"][-1]
    assert step == STEPS
    for name in ("code", "web"):
        got, ref = at_end[name], result["direct"][name]
        assert ref["padded_vocab"] == 576 and ref["vocab"] == 512
        assert got["tokens"] == ref["tokens"] == 10 * 64
        assert _close(got["loss"], ref["loss"], 1e-5), (name, got, ref)
        assert got["top1"] == ref["top1"] and got["top5"] == ref["top5"], (name, got, ref)
        assert 0 < got["top1"] < got["top5"]
        # Padding ids ranked above every real id: still excluded from top-k and the loss
        # (the softmax ranges over the real vocabulary, as in the exported HF model).
        boosted = ref["boosted"]
        assert boosted["direct"]["top5"] == got["top5"]
        assert _close(boosted["direct"]["loss"], got["loss"], 1e-5)
        for key in ("top1", "top5", "tokens"):
            assert boosted["token_stats"][key] == boosted["direct"][key], (name, key, boosted)
        assert _close(boosted["token_stats"]["loss"], boosted["direct"]["loss"], 1e-5)


@pytest.mark.slow
def test_standalone_eval_reproduces_end_of_training(trained):
    """``phoenix eval`` on the final checkpoint (a fresh model loading the saved weights)."""
    _, result = trained
    assert result["cli_rc"] == 0
    report = result["cli_json"]
    assert report["step"] == STEPS and report["checkpoint"].endswith("step_000004")
    _, at_end = result["evals"][-1]
    for name in ("code", "web"):
        for key in (*KEYS, "tokens"):
            assert _close(report["sets"][name][key], at_end[name][key], 1e-9), (name, key)


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["parallel.tensor=2", "parallel.pipeline=2"])
def test_parallel_layouts_match_single_process(layout, trained, tiny_data, tmp_path):
    run_dir, result = trained
    out = tmp_path / "eval.json"
    assert run_distributed(run_eval_cli, 2, [*_cli_args(run_dir, tiny_data, out), layout]) == [0, 0]
    report = json.loads(out.read_text())
    assert report["layout"].startswith("world=2 " + ("tp=2" if "tensor" in layout else "tp=1 pp=2"))
    _, at_end = result["evals"][-1]
    for name in ("code", "web"):
        for key in (*KEYS, "tokens"):
            assert _close(report["sets"][name][key], at_end[name][key], 1e-5), (name, key)


def test_cli_errors(tiny_data, tmp_path, capsys):
    from phoenix.eval.run import main

    cfg = tmp_path / "c.yaml"
    import yaml

    cfg.write_text(yaml.safe_dump(tiny_config_dict(tiny_data, tmp_path / "run")))
    assert main([str(tmp_path / "nowhere"), str(cfg), "--set", f"code={tiny_data.prefixes['code']}"]) == 2
    assert "checkpoint not found" in capsys.readouterr().err
    assert main([str(tmp_path), str(cfg)]) == 2  # no eval sets anywhere
    assert "--set NAME=PREFIX" in capsys.readouterr().err


@pytest.mark.slow
def test_eval_follows_the_stage_sequence_length(tiny_data, tmp_path):
    """A context-extension stage evaluates at its own length (the same samples count,
    twice the tokens), and the document mask reaches eval: EOD inputs carry no loss."""
    config = _config(tiny_data, tmp_path)
    config["train"] = {**config["train"], "steps": None}
    config["stages"] = [{"name": "short", "steps": 2, "mixture": {"web": 1.0}},
                        {"name": "long", "steps": 2, "mixture": {"web": 1.0}, "seq_length": 128}]
    config["logging"] = {"tensorboard": False}
    section = {"sets": [{"name": "code", "prefix": tiny_data.prefixes["code"]}], "interval": 2,
               "max_samples": 4, "micro_batch_size": 2}
    (result,) = run_distributed(train_with_eval, 1, config, [], section)
    assert [(step, sets["code"]["tokens"]) for step, sets in result["evals"]] == [(2, 4 * 64),
                                                                                 (4, 4 * 128)]
    (masked,) = run_distributed(train_with_eval, 1, config,
                                ["data.document_mask=true", "data.eod_mask_loss=true",
                                 f"output_dir={tmp_path / 'masked'}"], section)
    short, long = (sets["code"]["tokens"] for _, sets in masked["evals"])
    assert 0 < 4 * 64 - short < 4 * 64 / 4 and 0 < 4 * 128 - long < 4 * 128 / 4
